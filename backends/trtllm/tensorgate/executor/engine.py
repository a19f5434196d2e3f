"""The interface every engine implements (trtllm, transformers, synthetic).

An engine runs its own loop (a thread or a task), takes new requests and cancellations at any
time, and hands the server one `IterationOutput` per engine iteration through `emit`, so the
executor sends O(iterations) messages, not O(tokens). It never detokenizes. Request ids given
to an engine are the server's engine-wide ids; the server maps them back to the router's.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tensorgate.executor.control import (
    ControlFeatures,
    ControlResult,
    ControlUnsupported,
    WeightVersions,
)
from tensorgate.v1 import executor_pb2 as pb

# One iteration's outputs, already in the wire type so that nothing is copied on the way out.
# Called from the engine's own thread; the server hops to its event loop.
Emit = Callable[[pb.IterationOutput], None]


class EngineError(Exception):
    """The engine cannot start or cannot serve; the message is for the user."""


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_num_tokens: int
    max_top_n_tokens: int = 0


@dataclass(frozen=True)
class EngineFeatures:
    """What the engine really honours; the router refuses what is not claimed here."""

    logprobs: bool = False
    top_n_tokens: bool = False
    seed: bool = False
    top_k: bool = False
    top_p: bool = False
    typical_p: bool = False
    repetition_penalty: bool = False
    frequency_penalty: bool = False
    presence_penalty: bool = False
    stop_token_ids: bool = False
    guided_decoding: bool = False
    min_new_tokens: bool = False
    logit_bias: bool = False
    ignore_eos: bool = False
    # GenerateRequest.return_prompt_logprobs: the prompt's log probabilities on the first output.
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    engine: str
    dtype: str
    device: str
    vocab_size: int
    eos_token_ids: list[int]
    limits: EngineLimits
    kv_capacity_tokens: int
    features: EngineFeatures

    def to_proto(self, version: str) -> pb.InfoResponse:
        return pb.InfoResponse(
            model_id=self.model_id,
            engine=self.engine,
            dtype=self.dtype,
            device=self.device,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            limits=pb.Limits(**dataclasses.asdict(self.limits)),
            kv_capacity_tokens=self.kv_capacity_tokens,
            features=pb.Features(**dataclasses.asdict(self.features)),
            executor_version=version,
        )


@dataclass
class Counters:
    """Lifetime counters reported by Stats. Engines that update them from more than one
    thread hold their own lock around the updates."""

    iterations: int = 0
    requests_received: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    last_iteration_ms: float = 0.0

    def to_proto(
        self, active: int, queued: int, blocks_used: int, blocks_free: int, block_size: int
    ) -> pb.StatsResponse:
        return pb.StatsResponse(
            active_requests=active,
            queued_requests=queued,
            kv_blocks_used=blocks_used,
            kv_blocks_free=blocks_free,
            kv_block_size=block_size,
            last_iteration_ms=self.last_iteration_ms,
            iterations=self.iterations,
            requests_received=self.requests_received,
            requests_finished=self.requests_finished,
            requests_cancelled=self.requests_cancelled,
            requests_failed=self.requests_failed,
            tokens_generated=self.tokens_generated,
        )


def add_finished(batch: pb.IterationOutput, request_id: int, reason: int, error: str = "") -> None:
    batch.outputs.add(request_id=request_id, finish_reason=reason, error=error)


def check_request(req: pb.GenerateRequest, limits: EngineLimits) -> str | None:
    """The engine-side guard: the router validates first, but a request over the engine's
    limits must fail with a message naming the limit rather than break the engine."""
    n = len(req.input_ids)
    if n == 0:
        return "input_ids is empty: a request needs at least one prompt token"
    if n > limits.max_input_tokens:
        return f"prompt has {n} tokens; the engine's max_input_tokens is {limits.max_input_tokens}"
    if req.max_new_tokens == 0:
        return "max_new_tokens is 0; it must be at least 1"
    if n + req.max_new_tokens > limits.max_total_tokens:
        return (
            f"prompt ({n}) + max_new_tokens ({req.max_new_tokens}) exceeds the engine's "
            f"max_total_tokens of {limits.max_total_tokens}"
        )
    if req.top_n_tokens > limits.max_top_n_tokens:
        return (
            f"top_n_tokens is {req.top_n_tokens}; the engine's max_top_n_tokens is "
            f"{limits.max_top_n_tokens}"
        )
    if req.resumed_tokens > n:
        return (
            f"resumed_tokens is {req.resumed_tokens}, more than the {n} input_ids it counts "
            "back from: it must be at most len(input_ids)"
        )
    if req.resumed_tokens and req.HasField("grammar"):
        # A grammar's matcher state is not on the wire: it cannot continue elsewhere.
        return "resumed_tokens with a grammar: a constrained request cannot be resumed"
    return None


def check_features(req: pb.GenerateRequest, features: EngineFeatures) -> str | None:
    """The engine-side guard for what the engine does not honour: the router refuses such a
    request first (it reads the same flags), but one that gets here anyway must fail, naming
    the field, rather than run without the constraint it asked for."""
    s = req.sampling
    asked = (
        ("grammar", req.HasField("grammar"), features.guided_decoding),
        ("min_new_tokens", req.min_new_tokens > 0, features.min_new_tokens),
        ("logit_bias", len(req.logit_bias) > 0, features.logit_bias),
        ("stop_token_ids", len(req.stop_token_ids) > 0, features.stop_token_ids),
        ("ignore_eos", req.ignore_eos, features.ignore_eos),
        ("repetition_penalty", s.repetition_penalty not in (0.0, 1.0), features.repetition_penalty),
        ("frequency_penalty", s.frequency_penalty != 0.0, features.frequency_penalty),
        ("presence_penalty", s.presence_penalty != 0.0, features.presence_penalty),
        ("typical_p", s.do_sample and 0.0 < s.typical_p < 1.0, features.typical_p),
        ("return_prompt_logprobs", req.return_prompt_logprobs, features.prompt_logprobs),
    )
    for name, used, honoured in asked:
        if used and not honoured:
            return f"{name} is not supported by this engine; leave it unset"
    return None


class Engine(abc.ABC):
    """Lifecycle: construct (loads; raises EngineError), `start(emit)`, then `submit`/`cancel`
    from any thread, `stats()`/`health()` at any time, `shutdown()` once."""

    def __init__(self) -> None:
        self.counters = Counters()
        # Set from --weight-version by load_engine; advanced by the engine's updates.
        self.versions = WeightVersions()

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def start(self, emit: Emit) -> None:
        """Starts the engine loop; `emit` is called from the loop once per iteration."""

    @abc.abstractmethod
    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        """Queues requests. Ids are unique among live requests (the server maps them). A request
        the engine cannot run ends with a FINISH_REASON_ERROR output, never silence."""

    @abc.abstractmethod
    def cancel(self, request_ids: list[int]) -> None:
        """Stops requests; each live one ends with a FINISH_REASON_CANCELLED output. Unknown
        ids are ignored."""

    @abc.abstractmethod
    def stats(self) -> pb.StatsResponse: ...

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stops the loop; live requests end with an error output."""

    def health(self) -> tuple[bool, str]:
        return True, ""

    def kv_cache_event_batch(self) -> pb.KvCacheEventBatch | None:
        """The KV-cache events published since the last call, oldest first (may be empty);
        None when this engine publishes none (the RPC then answers UNIMPLEMENTED)."""
        return None

    def describe(self, executor_version: str) -> pb.InfoResponse:
        """Info: the engine's static facts plus its rollout-control state."""
        info = self.info().to_proto(executor_version)
        info.weight_version = self.weight_version
        info.control.CopyFrom(self.control_features().to_proto())
        info.released_memory_tags.extend(self.released_memory_tags())
        return info

    # -- rollout control (RL trainers) ------------------------------------------------------------
    # Called by the server off its event loop, one at a time (never two control calls at once),
    # while generation goes on in the engine's own thread. Each either does all it says or
    # raises a ControlError having changed nothing. An engine overrides what it can do; the
    # rest answers UNIMPLEMENTED, naming the engine.

    @property
    def weight_version(self) -> str:
        """The label of the weights now serving; final outputs carry it."""
        return self.versions.current

    def control_features(self) -> ControlFeatures:
        return ControlFeatures()

    def released_memory_tags(self) -> list[str]:
        return []

    def _unsupported(self, what: str) -> ControlUnsupported:
        return ControlUnsupported(f"the {self.info().engine} engine cannot {what}")

    def release_memory(self, tags: list[str]) -> ControlResult:
        """Frees the memory under `tags` (empty: every tag the engine has); generation is
        refused until they are resumed."""
        raise self._unsupported("release memory")

    def resume_memory(self, tags: list[str]) -> ControlResult:
        raise self._unsupported("resume memory")

    def update_weights(self, request: pb.UpdateWeightsRequest) -> ControlResult:
        """Loads new weights, checked whole before any is written."""
        raise self._unsupported("update its weights")

    def flush_cache(self) -> ControlResult:
        """Drops every cached prefix block."""
        raise self._unsupported("flush its cache")

    def pause_generation(self) -> ControlResult:
        """Stops stepping, keeping every request and its KV cache, until continue_generation."""
        raise self._unsupported("pause generation in place")

    def continue_generation(self) -> ControlResult:
        raise self._unsupported("continue generation")


class Inbox:
    """Requests and cancellations handed from the server's thread to an engine loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[pb.GenerateRequest] = []
        self._cancels: list[int] = []
        self.wake = threading.Event()

    def put_requests(self, requests: list[pb.GenerateRequest]) -> None:
        with self._lock:
            self._requests.extend(requests)
        self.wake.set()

    def put_cancels(self, ids: list[int]) -> None:
        with self._lock:
            self._cancels.extend(ids)
        self.wake.set()

    def drain(self) -> tuple[list[pb.GenerateRequest], list[int]]:
        with self._lock:
            reqs, self._requests = self._requests, []
            cancels, self._cancels = self._cancels, []
            self.wake.clear()
        return reqs, cancels
