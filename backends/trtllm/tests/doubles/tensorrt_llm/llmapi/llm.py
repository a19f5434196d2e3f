"""!!! TEST DOUBLE — THIS IS NOT TENSORRT-LLM AND RUNS NO MODEL, NO GPU CODE !!!

A stand-in for `tensorrt_llm.LLM` (the LLM API on the PyTorch backend), used only by
tensorgate's tests. It reproduces what tensorgate relies on, as TensorRT-LLM's source defines
it (NVIDIA/TensorRT-LLM; `tensorrt_llm/llmapi/llm.py` at commit 4c05a74891e4, the release line
that still has both backends, unless said otherwise):

- `LLM(model, tokenizer=None, ..., tensor_parallel_size=1, dtype="auto", **kwargs)`; a keyword
  that is not an LlmArgs field is a ValueError ("got invalid argument": `BaseLLM.__init__`'s
  `valid_keys` check); more GPUs asked for (tp x pp) than visible is a RuntimeError ("Only N
  GPUs are available, but M are required.": `BaseLLM.__init__`);
- `generate_async(inputs, sampling_params, streaming=...)` -> a result (executor/result.py
  here); after `shutdown()` a RuntimeError "LLM is shutting down" (`generate_async`); without
  `enable_chunked_prefill`, a prompt longer than `max_num_tokens` is a ValueError
  (`_check_arguments`, PyTorch branch); a non-SamplingParams is a TypeError
  (`_prepare_sampling_params`);
- the PyTorch sampler ends a request on `end_id` (-1 when `ignore_eos`: `ignore_eos` makes the
  worker send `end_id=-1`, `tensorrt_llm/executor/base_worker.py` `_enqueue_request`), on a stop
  token id, or at `max_tokens`; `min_tokens` holds both ends off; the end token itself is not
  returned (as the C++ Result does; `TEST_DOUBLE.end_token_returned` flips it, since whether the
  PyTorch sampler returns it was not verified) and finish_reason is 'stop' with no stop_reason;
- `get_stats(timeout)` -> list of dicts, one per iteration, with the C++ IterationStats JSON
  names (`iterLatencyMS`, `numActiveRequests`, `numQueuedRequests`, `kvCacheStats.maxNumBlocks`
  / `freeNumBlocks` / `usedNumBlocks` / `tokensPerBlock`, `inflightBatchingStats.
  numPausedRequests`; docs/source/commands/trtllm-serve `/metrics` example), only when
  `enable_iter_perf_stats=True` ("Enable iteration performance statistics", llm_args.py);
- `get_kv_cache_events(timeout)` -> list of dicts shaped as `KVCacheEventSerializer` writes
  them (`tensorrt_llm/_utils.py`: `event_id`, `data.type` 'stored' with `blocks[].block_hash`
  and `tokens[].token_id`, or 'removed' with `block_hashes`, `window_size`), only when
  `kv_cache_config.event_buffer_max_size > 0` and block reuse is on (`get_kv_cache_events`'
  docstring), at most that many kept;
- `_collective_rpc(method, args, kwargs, non_block, unique_reply_rank)` runs a worker
  extension method on every rank and returns their results; without the Ray orchestrator it is
  a ValueError ("does not support collective RPC": `_TorchLLM._collective_rpc`); the extension
  is `rlhf_utils.WorkerExtension` (`tensorrt_llm/llmapi/rlhf_utils.py`):
  `update_weights(ipc_handles)`: a device UUID missing from the handles is a ValueError ("Device
  UUID ... not found in ipc_handles"); a str value is base64 of a pickle, read by TensorRT-LLM's
  restricted unpickler (`serialization.loads`), which must give a list ("Deserialized data must
  be a list, got ... instead") of (name, (func, args)); `update_weights(None)` finalises and
  resets the prefix cache; `reset_prefix_cache()`; plus the Ray worker's `sleep(tags)` /
  `wakeup(tags)` (`tensorrt_llm/executor/ray_gpu_worker.py`), which need `enable_sleep=True`
  ("Sleep feature is not enabled ...") and refuse a tag that is not an ExecutorMemoryType
  ("Unknown memory tag ...", `verify_sleep_wakeup_tags`, `tensorrt_llm/_torch/
  virtual_memory.py`). Each runs under `control_action_decorator` (`tensorrt_llm/_ray_utils.py`):
  in-flight requests are drained first (the double waits for them, at most
  `TEST_DOUBLE.drain_timeout_s`, then raises, where TensorRT-LLM would wait on);
- `shutdown()` stops it; a second call does nothing (`BaseLLM.shutdown`);
- `SamplingParams(return_context_logits=True)`: the request's first response carries the
  prompt's context logits, [prompt tokens, vocab] (the PyTorch executor gathers them for a
  context request that asks: `_torch/pyexecutor/py_executor.py` `_forward_step`); the double's
  values are the executor double's `double_context_logits`;
- `SamplingParams(return_perf_metrics=True)`: every response carries the request's
  `RequestPerfMetrics`, whose `kv_cache_metrics.num_reused_blocks` counts the prompt's blocks
  reused from the prefix cache (the double reports `TEST_DOUBLE.reused_blocks`).

NOT reproduced: any model (tokens are a deterministic function of the prompt and step), CUDA,
MPI or Ray processes, detokenization, beam search, speculative decoding, LoRA, multimodal input,
the exact wording of most error messages. Test-only knobs live in `TEST_DOUBLE`.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tensorrt_llm.bindings.executor import RequestPerfMetrics, double_context_logits
from tensorrt_llm.executor.result import GenerationResult, Step
from tensorrt_llm.sampling_params import SamplingParams

IS_TEST_DOUBLE = True

# ExecutorMemoryType's values (tensorrt_llm/_torch/virtual_memory.py, the release with
# MODEL_WEIGHTS_MAIN), what verify_sleep_wakeup_tags accepts.
EXECUTOR_MEMORY_TYPES = (
    "sampler",
    "drafter",
    "guided_decoder",
    "spec_resource_manager",
    "_no_capture_init_kv_cache",
    "_no_capture_init_extra_resources",
    "model_extra",
    "executor_extra",
    "kv_cache",
    "model",
    "draft_model",
    "model_weights",
    "draft_model_weights",
)


class _IpcUnpickler(pickle.Unpickler):
    """TensorRT-LLM's serialization.loads as update_weights calls it: approved imports only
    (the CUDA IPC rebuild and the torch types its arguments name)."""

    def find_class(self, module: str, name: str):
        if module == "torch.multiprocessing.reductions" and name == "rebuild_cuda_tensor":
            return super().find_class(module, name)
        if module in ("torch", "torch.storage", "torch._tensor"):
            return super().find_class(module, name)
        raise ValueError(f"Import {module} | {name} is not allowed")


# LlmArgs fields the double knows (a subset of TorchLlmArgs.model_fields).
_VALID_KWARGS = {
    "max_seq_len",
    "max_batch_size",
    "max_num_tokens",
    "pipeline_parallel_size",
    "kv_cache_config",
    "enable_chunked_prefill",
    "guided_decoding_backend",
    "enable_iter_perf_stats",
    "orchestrator_type",
    "ray_worker_extension_cls",
    "enable_sleep",
    "backend",
}


@dataclass
class DoubleSettings:
    iteration_ms: float = 1.0
    token_fn: Callable[[list[int], int], int] | None = None
    # first prompt token -> step at which the request fails with an executor error
    fail_at: dict[int, int] = field(default_factory=dict)
    gpu_count: int = 8
    kv_blocks: int = 512
    tokens_per_block: int = 32
    end_token_returned: bool = False
    paused_requests: int = 0
    device_uuid: str = "GPU-double-0"
    llms: list[LLM] = field(default_factory=list)
    # (prompt, SamplingParams) of every generate_async, for assertions
    requests: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    rpc_calls: list[tuple[str, tuple]] = field(default_factory=list)
    drain_timeout_s: float = 5.0
    # Prompt lengths whose first response leaves the context logits out although asked for.
    no_context_logits_for: set[int] = field(default_factory=set)
    # first prompt token -> KV blocks its context reused, in the request's perf metrics when
    # SamplingParams(return_perf_metrics=True) (the double caches nothing itself)
    reused_blocks: dict[int, int] = field(default_factory=dict)


TEST_DOUBLE = DoubleSettings()


def reset() -> None:
    global TEST_DOUBLE
    for llm in TEST_DOUBLE.llms:
        llm.shutdown()
    TEST_DOUBLE = DoubleSettings()


@dataclass
class _Live:
    rid: int
    prompt: list[int]
    sp: SamplingParams
    result: GenerationResult
    generated: list[int] = field(default_factory=list)
    aborted: bool = False
    blocks: list[int] = field(default_factory=list)


class LLM:
    def __init__(
        self,
        model: str | Path,
        tokenizer: object | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: object,
    ) -> None:
        for key in kwargs:
            if key not in _VALID_KWARGS:
                raise ValueError(f"{type(self).__name__} got invalid argument: {key}")
        self.model = Path(model)
        config = json.loads((self.model / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        pp = int(kwargs.get("pipeline_parallel_size", 1))
        world = tensor_parallel_size * pp
        if world > 1 and TEST_DOUBLE.gpu_count < world:
            raise RuntimeError(
                f"Only {TEST_DOUBLE.gpu_count} GPUs are available, but {world} are required."
            )
        self.kwargs = dict(kwargs, tensor_parallel_size=tensor_parallel_size, dtype=dtype)
        self.world_size = world
        self.max_seq_len = int(kwargs.get("max_seq_len") or config["max_position_embeddings"])
        self.max_batch_size = int(kwargs.get("max_batch_size") or 2048)
        self.max_num_tokens = int(kwargs.get("max_num_tokens") or 8192)
        self.chunked = bool(kwargs.get("enable_chunked_prefill", False))
        self.kv_cache_config = kwargs.get("kv_cache_config")
        self.ray = kwargs.get("orchestrator_type") == "ray"
        self.sleeping: set[str] = set()
        self.weights_version = 0
        self.loaded_names: list[str] = []  # names of every handle update_weights received
        self.prefix_cache_resets = 0
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: deque[_Live] = deque()
        self._active: dict[int, _Live] = {}
        self._stats: list[dict] = []
        self._events: deque[dict] = deque(maxlen=max(self._event_buffer(), 1))
        self._event_ids = itertools.count()
        self._iter = 0
        self._shut = False
        self._thread = threading.Thread(target=self._loop, name="llmapi-double", daemon=True)
        self._thread.start()
        TEST_DOUBLE.llms.append(self)

    def _event_buffer(self) -> int:
        kv = self.kv_cache_config
        if kv is None or not kv.enable_block_reuse:
            return 0
        return kv.event_buffer_max_size

    # -- the real API -----------------------------------------------------------------------

    def generate_async(
        self, inputs, sampling_params: SamplingParams | None = None, streaming: bool = False, **kw
    ) -> GenerationResult:
        if self._shut:
            raise RuntimeError("LLM is shutting down")
        sp = sampling_params or SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(
                f"The sampling_params must be type SamplingParams or None, but got {type(sp)}"
            )
        if self.sleeping:
            # TensorRT-LLM would run on released memory; the double says so loudly.
            raise RuntimeError(
                f"TEST DOUBLE: generate_async while sleeping {sorted(self.sleeping)}"
            )
        prompt = list(inputs)
        if not self.chunked and len(prompt) > self.max_num_tokens:
            raise ValueError(
                f"The sum of prompt length ({len(prompt)}), query length (0) should not exceed "
                f"max_num_tokens ({self.max_num_tokens})"
            )
        rid = next(self._ids)
        result = GenerationResult(rid, prompt, sp, self._abort_request)
        TEST_DOUBLE.requests.append((prompt, sp))
        with self._lock:
            self._waiting.append(_Live(rid, prompt, sp, result))
            self._lock.notify_all()
        return result

    def get_stats(self, timeout: float | None = 2) -> list[dict]:
        deadline = time.monotonic() + (timeout or 0)
        with self._lock:
            while not self._stats and not self._shut and time.monotonic() < deadline:
                self._lock.wait(max(deadline - time.monotonic(), 0))
            out, self._stats = self._stats, []
            return out

    def get_kv_cache_events(self, timeout: float | None = 2) -> list[dict]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out

    def _collective_rpc(
        self,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        non_block: bool = False,
        unique_reply_rank: int | None = None,
    ) -> list:
        if not self.ray:
            raise ValueError(
                "Executor type GenerationExecutorProxy does not support collective RPC."
            )
        TEST_DOUBLE.rpc_calls.append((method, tuple(args)))
        fn = getattr(self, f"_rpc_{method}", None)
        if fn is None:
            raise AttributeError(f"worker has no method {method!r}")
        results = [fn(*args, **(kwargs or {})) for _ in range(self.world_size)]
        return results if unique_reply_rank is None else [results[unique_reply_rank]]

    def shutdown(self) -> None:
        if self._shut:
            return
        with self._lock:
            self._shut = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- worker extension (rlhf_utils.WorkerExtension and the Ray worker) --------------------------

    def _control_action(self) -> None:
        """control_action_decorator: in-flight requests finish before the action runs."""
        deadline = time.monotonic() + TEST_DOUBLE.drain_timeout_s
        with self._lock:
            while self._waiting or self._active:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "TEST DOUBLE: control action still draining in-flight requests "
                        "(TensorRT-LLM would wait for them)"
                    )
                self._lock.wait(0.01)

    def _check_sleep(self, tags: list[str]) -> None:
        if not self.kwargs.get("enable_sleep"):
            raise ValueError(
                "Sleep feature is not enabled, please set enable_sleep=True in the LLM arguments."
            )
        for tag in tags:
            if tag not in EXECUTOR_MEMORY_TYPES:
                raise ValueError(
                    f"Unknown memory tag '{tag}'.Valid tags are: {list(EXECUTOR_MEMORY_TYPES)}"
                )

    def _rpc_sleep(self, tags: list[str]) -> None:
        self._check_sleep(tags)
        self._control_action()
        self.sleeping |= set(tags)

    def _rpc_wakeup(self, tags: list[str]) -> None:
        self._check_sleep(tags)
        self._control_action()
        self.sleeping -= set(tags)

    def _rpc_update_weights(self, ipc_handles: dict | None = None) -> None:
        self._control_action()
        if ipc_handles is None:
            self.weights_version += 1  # finalise: post-load processing, prefix cache reset
            self.prefix_cache_resets += 1
            return
        if TEST_DOUBLE.device_uuid not in ipc_handles:
            raise ValueError(f"Device UUID {TEST_DOUBLE.device_uuid} not found in ipc_handles")
        handles = ipc_handles[TEST_DOUBLE.device_uuid]
        if isinstance(handles, str):
            handles = _IpcUnpickler(io.BytesIO(base64.b64decode(handles))).load()
            if not isinstance(handles, list):
                raise ValueError(
                    f"Deserialized data must be a list, got {type(handles).__name__} instead"
                )
        for name, (func, args) in handles:
            # The worker calls func(*args) with args[6] = its device; no CUDA here.
            assert callable(func) and len(args) == 15
            self.loaded_names.append(name)

    def _rpc_reset_prefix_cache(self) -> None:
        self._control_action()
        self.prefix_cache_resets += 1

    # -- the simulation ---------------------------------------------------------------------

    def _abort_request(self, rid: int) -> None:
        with self._lock:
            for live in list(self._waiting) + list(self._active.values()):
                if live.rid == rid:
                    live.aborted = True

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._shut and not self._waiting and not self._active:
                    self._lock.wait(0.05)
                if self._shut:
                    return
                started = time.monotonic()
                self._step()
                self._record_stats((time.monotonic() - started) * 1000)
                self._lock.notify_all()
            time.sleep(TEST_DOUBLE.iteration_ms / 1000.0)

    def _step(self) -> None:
        for live in [x for x in self._waiting if x.aborted]:
            self._waiting.remove(live)
            live.result._put(Step([], finish_reason="cancelled"))
        while self._waiting and len(self._active) < self.max_batch_size:
            live = self._waiting.popleft()
            self._active[live.rid] = live
            self._store_blocks(live)
        self._iter += 1
        for live in list(self._active.values()):
            self._advance(live)

    def _advance(self, live: _Live) -> None:
        sp = live.sp
        if live.aborted:
            return self._end(live, Step([], finish_reason="cancelled"))
        step = len(live.generated)
        fail = TEST_DOUBLE.fail_at.get(live.prompt[0])
        if fail is not None and step >= fail:
            return self._end(live, Step([], error="test double: simulated failure in the executor"))
        token = self._token(live, step)
        lp = [-0.5 - 0.01 * (step % 5)] if sp.logprobs else None
        held = sp.min_tokens is not None and step + 1 < sp.min_tokens
        end_id = -1 if sp.ignore_eos else (sp.end_id if sp.end_id is not None else -1)
        max_tokens = min(sp.max_tokens, self.max_seq_len - len(live.prompt))
        if token == end_id and not held:
            if TEST_DOUBLE.end_token_returned:
                live.generated.append(token)
                return self._end(live, Step([token], lp, finish_reason="stop"))
            return self._end(live, Step([], [] if lp else None, finish_reason="stop"))
        live.generated.append(token)
        ctx = None
        if step == 0 and sp.return_context_logits:
            if len(live.prompt) not in TEST_DOUBLE.no_context_logits_for:
                ctx = double_context_logits(live.prompt, self.vocab_size)
        perf = None
        if sp.return_perf_metrics:
            perf = RequestPerfMetrics()
            reused = TEST_DOUBLE.reused_blocks.get(live.prompt[0], 0)
            perf.kv_cache_metrics.num_reused_blocks = reused
        if token in (sp.stop_token_ids or []) and not held:
            stop = Step([token], lp, finish_reason="stop", stop_reason=token, context_logits=ctx)
            stop.request_perf_metrics = perf
            return self._end(live, stop)
        if len(live.generated) >= max_tokens:
            end = Step([token], lp, finish_reason="length", context_logits=ctx)
            end.request_perf_metrics = perf
            return self._end(live, end)
        live.result._put(Step([token], lp, context_logits=ctx, request_perf_metrics=perf))

    def _token(self, live: _Live, step: int) -> int:
        if TEST_DOUBLE.token_fn is not None:
            return int(TEST_DOUBLE.token_fn(list(live.prompt), step))
        low = min(100, self.vocab_size // 4)
        span = self.vocab_size - low
        token = low + (sum(live.prompt) * 31 + step * 7919 + 17) % span
        if token == live.sp.end_id:
            token = low + (token - low + 1) % span
        return token

    def _end(self, live: _Live, step: Step) -> None:
        self._active.pop(live.rid, None)
        live.result._put(step)
        if live.blocks and self._event_buffer():
            self._event({"type": "removed", "block_hashes": list(live.blocks)})

    def _store_blocks(self, live: _Live) -> None:
        per = TEST_DOUBLE.tokens_per_block
        full = [live.prompt[i : i + per] for i in range(0, len(live.prompt) - per + 1, per)]
        live.blocks = [hash(tuple(live.prompt[: (i + 1) * per])) for i in range(len(full))]
        if full and self._event_buffer():
            self._event(
                {
                    "type": "stored",
                    "parent_hash": None,
                    "blocks": [
                        {
                            "type": "stored_block",
                            "block_hash": h,
                            "tokens": [
                                {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                                for t in toks
                            ],
                            "cache_level": 0,
                            "priority": 35,
                        }
                        for h, toks in zip(live.blocks, full, strict=True)
                    ],
                }
            )

    def _event(self, data: dict) -> None:
        self._events.append({"event_id": next(self._event_ids), "data": data, "window_size": 0})

    def _record_stats(self, latency_ms: float) -> None:
        if not self.kwargs.get("enable_iter_perf_stats"):
            return
        per = TEST_DOUBLE.tokens_per_block
        used = sum(-(-(len(x.prompt) + len(x.generated)) // per) for x in self._active.values())
        self._stats.append(
            {
                "iter": self._iter,
                "iterLatencyMS": latency_ms,
                "numActiveRequests": len(self._active),
                "numQueuedRequests": len(self._waiting),
                "kvCacheStats": {
                    "maxNumBlocks": TEST_DOUBLE.kv_blocks,
                    "usedNumBlocks": used,
                    "freeNumBlocks": TEST_DOUBLE.kv_blocks - used,
                    "tokensPerBlock": per,
                },
                "inflightBatchingStats": {"numPausedRequests": TEST_DOUBLE.paused_requests},
            }
        )
