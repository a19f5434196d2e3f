"""Rollout control for the trtllm engine's LLM API flavour: TensorRT-LLM's own RL path, the
worker methods that trtllm-serve's control routes call.

trtllm-serve (tensorrt_llm/serve/openai_server.py, OpenAIServer) answers
  POST /release_memory  -> generator.collective_rpc('sleep', args=(request.tags,))
  POST /resume_memory   -> generator.collective_rpc('wakeup', args=(request.tags,))
  POST /update_weights  -> generator.collective_rpc('update_weights', args=(request.weights,))
and this engine makes the same calls through `LLM._collective_rpc(method, args=...)` (llm.py),
which runs on TensorRT-LLM's Ray orchestrator only (hence --rl-hooks):
- `sleep(sleep_tags)` / `wakeup(wakeup_tags)`: the Ray worker's (tensorrt_llm/executor/
  ray_gpu_worker.py RayGPUWorker), which need `enable_sleep=True` and check each tag with
  `verify_sleep_wakeup_tags` (ExecutorMemoryType, tensorrt_llm/_torch/virtual_memory.py);
- `update_weights(ipc_handles)`: rlhf_utils.WorkerExtension (tensorrt_llm/llmapi/
  rlhf_utils.py): a dict of device UUID -> the base64 text of the pickled list of
  (name, (rebuild_cuda_tensor, args)) loads those weights (`model_loader.reload(...,
  allow_partial_loading=True)`); None finalises (process_weights_after_loading,
  post_load_weights, reset_prefix_cache);
- `reset_prefix_cache()`: rlhf_utils.WorkerExtension, for FlushCache.
Each of these is wrapped in `control_action_decorator` (tensorrt_llm/_ray_utils.py), which
drains in-flight requests before it runs: so a release first ends and aborts every live request
(with an error saying why) rather than wait for them.

What TensorRT-LLM cannot do here answers UNIMPLEMENTED with the reason: updates from a
checkpoint directory or serialized CPU tensors (the worker extension takes CUDA IPC handles
only) and an in-place pause (the LLM API has none).
"""

from __future__ import annotations

import base64
import logging
import time

from tensorgate.executor.control import (
    KV_CACHE,
    MODEL,
    TRTLLM_MEMORY_TAGS,
    ControlConflict,
    ControlError,
    ControlFeatures,
    ControlInvalid,
    ControlResult,
    ControlUnsupported,
    update_source,
)
from tensorgate.executor.weights_pickle import decode_cuda_ipc
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.trtllm_llmapi")

# What "every tag" means for a release with none named: the tags verl's trtllm rollout releases
# (TRTLLMAsyncRollout._WEIGHTS_TAGS + ["kv_cache"], verl/workers/rollout/trtllm_rollout/
# trtllm_rollout.py), all of them ExecutorMemoryType values of the TensorRT-LLM it targets.
ALL_TAGS = (
    "sampler",
    "drafter",
    "guided_decoder",
    "spec_resource_manager",
    "model_extra",
    "executor_extra",
    MODEL,
    "draft_model",
    KV_CACHE,
)

NEEDS_HOOKS = (
    "runs only on TensorRT-LLM's Ray orchestrator with its RL worker extension: start the "
    "executor with --rl-hooks"
)


class LlmApiControl:
    """Control state of one TrtllmLlmApiEngine; runs on the server's control thread."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.released: frozenset[str] = frozenset()  # replaced whole: submit reads it
        self._buckets = 0

    @property
    def hooks(self) -> bool:
        return self.engine.settings.rl_hooks

    def features(self) -> ControlFeatures:
        if not self.hooks:
            return ControlFeatures()
        return ControlFeatures(memory_tags=ALL_TAGS, update_from_cuda_ipc=True, flush_cache=True)

    def refusal(self) -> str | None:
        released = self.released
        if not released:
            return None
        return (
            f"the engine's memory is released ({', '.join(sorted(released))}): resume it "
            "(/resume_memory) before generating"
        )

    def _rpc(self, method: str, *args: object) -> list:
        if not self.hooks:
            raise ControlUnsupported(f"the trtllm engine's {method} {NEEDS_HOOKS}")
        try:
            # LLM._collective_rpc(method, args=...): llm.py (the real one and the test double).
            return self.engine._llm._collective_rpc(method, args=args)
        except ValueError as e:
            # TensorRT-LLM's own refusals of a bad argument: an unknown memory tag
            # (verify_sleep_wakeup_tags), a device UUID missing from the handles, a payload that
            # is not a list (WorkerExtension.update_weights).
            raise ControlInvalid(f"TensorRT-LLM refused {method}: {e}") from None
        except Exception as e:
            raise ControlError(f"TensorRT-LLM failed {method}: {type(e).__name__}: {e}") from None

    # -- memory ---------------------------------------------------------------------------------

    def release(self, tags: list[str]) -> ControlResult:
        tags = self._tags(tags)
        if not self.hooks:
            self._rpc("sleep")  # raises, naming --rl-hooks
        started = time.monotonic()
        free_before = _device_free()
        self.released = self.released | set(tags)
        try:
            # control_action drains in-flight requests before sleep runs: end them now, with
            # a reason, instead of waiting on them.
            self.engine.end_live(
                f"the request was ended: the engine's memory was released ({', '.join(tags)})"
            )
            self._rpc("sleep", list(tags))
        except BaseException:
            self.released = self.released - set(tags)
            raise
        freed = _delta(free_before, _device_free())
        return ControlResult(
            message=f"released {', '.join(tags)} in {_ms(started)}; {_note(freed, 'freed')}",
            memory_delta_bytes=freed or 0,
        )

    def resume(self, tags: list[str]) -> ControlResult:
        tags = self._tags(tags)
        started = time.monotonic()
        free_before = _device_free()
        self._rpc("wakeup", list(tags))
        self.released = self.released - set(tags)
        freed = _delta(free_before, _device_free())
        taken = None if freed is None else -freed
        return ControlResult(
            message=f"resumed {', '.join(tags)} in {_ms(started)}; {_note(taken, 'taken back')}",
            memory_delta_bytes=freed or 0,
        )

    @staticmethod
    def _tags(tags: list[str]) -> list[str]:
        if not tags:
            return list(ALL_TAGS)
        unknown = sorted({t for t in tags if t not in TRTLLM_MEMORY_TAGS})
        if unknown:
            raise ControlInvalid(
                f"unknown memory tag(s) {', '.join(map(repr, unknown))}: TensorRT-LLM's are "
                f"{', '.join(TRTLLM_MEMORY_TAGS)}"
            )
        return list(dict.fromkeys(tags))

    # -- weights and cache ----------------------------------------------------------------------

    def update(self, req: pb.UpdateWeightsRequest) -> ControlResult:
        source = update_source(req)
        if source in ("model_path", "tensors"):
            raise ControlUnsupported(
                "the trtllm engine loads new weights only from CUDA IPC handles (TensorRT-LLM's "
                "WorkerExtension.update_weights); a checkpoint directory or serialized tensors "
                "need the transformers engine"
            )
        if MODEL in self.released:
            raise ControlConflict(
                "the weights are released: resume 'model' (/resume_memory) before updating them"
            )
        started = time.monotonic()
        if source == "finalize":
            self._rpc("update_weights", None)
            buckets, self._buckets = self._buckets, 0
            version = self.engine.versions.advance(req.weight_version)
            return ControlResult(
                message=f"finalized {buckets} bucket(s) in {_ms(started)} (TensorRT-LLM's "
                f"post-load hooks and prefix-cache reset): weights now {version!r}"
            )
        handles = dict(req.cuda_ipc.handles_by_gpu)
        if not handles:
            raise ControlInvalid("cuda_ipc carries no handles")
        names = 0
        for uuid, data in handles.items():
            # Our own check first (only rebuild_cuda_tensor and torch types admitted, every
            # argument typed), so a hostile pickle never reaches TensorRT-LLM's workers.
            try:
                names += len(decode_cuda_ipc(data))
            except ControlInvalid as e:
                raise ControlInvalid(f"handles for {uuid}: {e}") from None
        # trtllm-serve hands the worker the base64 text it received: WorkerExtension.
        # update_weights decodes a str with its restricted unpickler (serialization.loads).
        text = {uuid: base64.b64encode(data).decode("ascii") for uuid, data in handles.items()}
        self._rpc("update_weights", text)
        self._buckets += 1
        return ControlResult(
            message=f"bucket of {names} handle(s) for {len(handles)} GPU(s) loaded in "
            f"{_ms(started)}; the weight version changes at finalize",
            tensors_updated=names,
        )

    def flush(self) -> ControlResult:
        self._rpc("reset_prefix_cache")
        return ControlResult(message="TensorRT-LLM's prefix cache reset")

    def pause(self) -> ControlResult:
        raise ControlUnsupported(
            "the trtllm engine cannot pause in place: TensorRT-LLM's LLM API has no pause that "
            "keeps requests; pause with mode abort"
        )

    def resume_generation(self) -> ControlResult:
        return ControlResult(message="was not paused (the trtllm engine has no in-place pause)")


def _device_free() -> int | None:
    """Free memory on the GPU (device-wide: the workers are other processes), or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    except Exception:
        return None


def _delta(before: int | None, after: int | None) -> int | None:
    """Bytes freed (GPU free memory after - before), or None when not measured."""
    if before is None or after is None:
        return None
    return after - before


def _note(n: int | None, what: str) -> str:
    if n is None:
        return "memory not measured (no CUDA device visible to the executor process)"
    return f"{n / 2**20:.1f} MiB {what} (GPU free memory, device-wide)"


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.0f} ms"
