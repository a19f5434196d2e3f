"""Rollout control (RL trainers): the typed errors, results and feature flags that engines
return and the server maps onto the contract (ReleaseMemory, ResumeMemory, UpdateWeights,
FlushCache, PauseGeneration, ContinueGeneration).

Each error class is one gRPC status, mapped in one place (`ControlError.code`), so an engine
says what went wrong and the server never guesses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from tensorgate.v1 import executor_pb2 as pb

KV_CACHE = "kv_cache"
MODEL = "model"

# TensorRT-LLM's memory tags (ExecutorMemoryType in tensorrt_llm/_torch/virtual_memory.py, read by
# verify_sleep_wakeup_tags). verl's trtllm rollout releases all of them at once
# (TRTLLMAsyncRollout._WEIGHTS_TAGS + ["kv_cache"], verl/workers/rollout/trtllm_rollout/
# trtllm_rollout.py), so every engine accepts the whole vocabulary: a tag naming memory an
# engine does not have is a no-op it reports, not an error. Anything else is refused.
TRTLLM_MEMORY_TAGS = (
    "sampler",
    "drafter",
    "guided_decoder",
    "spec_resource_manager",
    "model_extra",
    "executor_extra",
    KV_CACHE,
    MODEL,
    "draft_model",
    "model_weights",
    "draft_model_weights",
)


class ControlError(Exception):
    """A control call that changed nothing; the message is for the caller."""

    code = grpc.StatusCode.INTERNAL


class ControlInvalid(ControlError):
    """A bad payload (unknown tensor, wrong shape or dtype, refused pickle global, unknown
    tag, ...): INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ControlConflict(ControlError):
    """The engine's state forbids it now (an update while the weights are released, a
    release while paused in place, ...): FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ControlUnsupported(ControlError):
    """The engine cannot do this at all: UNIMPLEMENTED. The message names the engine."""

    code = grpc.StatusCode.UNIMPLEMENTED


@dataclass(frozen=True)
class ControlFeatures:
    """What an engine's control calls really do (Info.control)."""

    memory_tags: tuple[str, ...] = ()
    update_from_disk: bool = False
    update_from_tensors: bool = False
    update_from_cuda_ipc: bool = False
    flush_cache: bool = False
    pause_in_place: bool = False

    def to_proto(self) -> pb.ControlFeatures:
        return pb.ControlFeatures(
            memory_tags=list(self.memory_tags),
            update_from_disk=self.update_from_disk,
            update_from_tensors=self.update_from_tensors,
            update_from_cuda_ipc=self.update_from_cuda_ipc,
            flush_cache=self.flush_cache,
            pause_in_place=self.pause_in_place,
        )


@dataclass(frozen=True)
class ControlResult:
    """What a control call did; the server adds the weight version and released tags."""

    message: str = ""
    memory_delta_bytes: int = 0
    tensors_updated: int = 0


def resolve_tags(asked: Iterable[str], supported: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The tags to act on (in `supported` order) and the known tags that name no memory of this
    engine. Empty `asked`: every supported tag. An unknown tag is ControlInvalid, naming the
    valid ones."""
    asked = list(asked)
    if not asked:
        return list(supported), []
    unknown = sorted({t for t in asked if t not in TRTLLM_MEMORY_TAGS})
    if unknown:
        raise ControlInvalid(
            f"unknown memory tag(s) {', '.join(map(repr, unknown))}: valid tags are "
            f"{', '.join(TRTLLM_MEMORY_TAGS)} (this engine holds memory under "
            f"{', '.join(supported) or 'none of them'})"
        )
    act = [t for t in supported if t in asked]
    noop = sorted({t for t in asked if t not in supported})
    return act, noop


def noop_note(noop: list[str]) -> str:
    """The part of a release/resume message about tags that name no memory here."""
    if not noop:
        return ""
    return f"; {', '.join(noop)}: no such memory in this engine (nothing to do)"


class WeightVersions:
    """The engine's weight_version: the executor's --weight-version at start, then the label
    each applied update names, or the count of applied updates when it names none."""

    def __init__(self, initial: str = "0") -> None:
        self.current = initial
        self.applied = 0

    def advance(self, requested: str) -> str:
        self.applied += 1
        self.current = requested or str(self.applied)
        return self.current


def update_source(req: pb.UpdateWeightsRequest) -> str:
    """Which source an UpdateWeights request carries; ControlInvalid when none."""
    source = req.WhichOneof("source")
    if source is None:
        raise ControlInvalid(
            "UpdateWeights carries no source: set one of cuda_ipc, model_path, tensors or finalize"
        )
    if source == "finalize" and not req.finalize:
        raise ControlInvalid("finalize must be true when it is the source")
    return source
