"""The trtllm engine's second flavour: TensorRT-LLM's LLM API (`tensorrt_llm.LLM`, PyTorch
backend) over a Hugging Face checkpoint, with no engine build.

TensorRT-LLM made the PyTorch backend its default in 1.0 and later removed the TensorRT-engine
executor (`docs/source/legacy/tensorrt-backend-removal.md`); this is the path that has a future.
An engine directory still selects the executor flavour (trtllm_engine.py; the choice is made in
launcher/model_source.py).

Every TensorRT-LLM name is cited where it is used ("llm.py" is `tensorrt_llm/llmapi/llm.py`,
"result.py" `tensorrt_llm/executor/result.py`). Tested against a TEST DOUBLE of the LLM API
(tests/doubles/tensorrt_llm/llmapi/), not on a GPU.

Threads: one asyncio loop thread owns every request: `submit` hands requests over with
`call_soon_threadsafe`, the loop calls `LLM.generate_async(..., streaming=True)` and runs one
task per request that reads its result step by step (`async for`, result.py `__anext__`). What
the tasks read is gathered and emitted once per loop turn: one IterationOutput for everything
that arrived together, O(steps) messages. A second thread polls iteration stats and KV-cache
events (both blocking calls with a timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tensorgate.executor.control import ControlFeatures, ControlResult
from tensorgate.executor.engine import (
    Emit,
    Engine,
    EngineError,
    EngineInfo,
    add_finished,
    check_request,
)
from tensorgate.executor.engines.trtllm_config import visible_gpu_count
from tensorgate.executor.engines.trtllm_engine import (
    ENGINE_DIR_ONLY,
    MISSING_TRTLLM,
    cached_from_reused_blocks,
    claimed_features,
    ignored_settings,
    special_ids,
)
from tensorgate.executor.engines.trtllm_llmapi_config import (
    LlmApiSettings,
    limits,
    llm_kwargs,
    read_checkpoint,
)
from tensorgate.executor.engines.trtllm_llmapi_control import LlmApiControl
from tensorgate.executor.engines.trtllm_llmapi_request import (
    LiveRequest,
    RequestMappingError,
    finish_reason,
    new_logprobs,
    sampling_kwargs,
)
from tensorgate.executor.kv_events import batch_from_trtllm
from tensorgate.executor.live_requests import LiveRequests
from tensorgate.executor.settings import EngineConfig
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.trtllm_llmapi")

STATS_POLL_S = 0.25
WARMUP_TIMEOUT_S = 600.0
KV_EVENTS_KEPT = 100_000


def import_llmapi() -> ModuleType:
    """`tensorrt_llm` with its LLM API, or an EngineError naming the image to use."""
    try:
        import tensorrt_llm
        from tensorrt_llm import LLM, SamplingParams  # noqa: F401  (both must exist)
        from tensorrt_llm.llmapi import KvCacheConfig  # noqa: F401
    except ImportError as e:
        raise EngineError(MISSING_TRTLLM.format(error=f"{type(e).__name__}: {e}")) from None
    return tensorrt_llm


@dataclass
class _Snapshot:
    """The last iteration stats: KV blocks (max, used, free, per block), queue, latency."""

    kv: tuple[int, int, int, int] = (0, 0, 0, 0)
    queued: int = 0
    paused: int = 0
    latency_ms: float | None = None


class TrtllmLlmApiEngine(Engine):
    def __init__(
        self,
        model_dir: Path,
        settings: LlmApiSettings | None = None,
        *,
        gpu_count=visible_gpu_count,
    ) -> None:
        super().__init__()
        s = settings or LlmApiSettings()
        self.settings = s
        self.checkpoint = read_checkpoint(Path(model_dir))
        self.limits = limits(self.checkpoint, s)
        trt = import_llmapi()
        world = s.tensor_parallel_size * s.pipeline_parallel_size
        n = gpu_count()
        if n < world:
            raise EngineError(
                f"--tensor-parallel-size {s.tensor_parallel_size} x --pipeline-parallel-size "
                f"{s.pipeline_parallel_size} needs {world} GPU(s); {n} visible"
            )
        self.world_size = world
        self.model_id = str(model_dir)
        eos, _ = special_ids(Path(model_dir), s.tokenizer_dir)
        self.eos_ids = eos
        if not eos:
            log.warning("no eos_token_id in %s: requests end only at max_new_tokens", model_dir)
        from tensorrt_llm.llmapi import KvCacheConfig  # llm_args.py KvCacheConfig

        kv_config = KvCacheConfig(
            free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
            enable_block_reuse=s.enable_kv_block_reuse,
            # "set event_buffer_max_size to a positive integer ... enable_block_reuse to True"
            # (llm.py get_kv_cache_events).
            event_buffer_max_size=s.kv_event_buffer_size,
        )
        kwargs = llm_kwargs(self.limits, s, kv_config)
        log.info("loading %s with TensorRT-LLM's LLM API (%s)", model_dir, kwargs)
        try:
            # LLM(model, ..., **kwargs): llm.py (LLM -> _TorchLLM -> BaseLLM). TP/PP ranks are
            # started by TensorRT-LLM itself (MpiPoolSession, or Ray with rl_hooks).
            self._llm = trt.LLM(str(model_dir), **kwargs)
        except Exception as e:
            raise EngineError(f"TensorRT-LLM could not load {model_dir}: {e}") from None
        self._SamplingParams = trt.SamplingParams
        self._lock = threading.Lock()
        self.live: LiveRequests[LiveRequest] = LiveRequests(self.counters)
        self._snapshot = _Snapshot()
        self._kv_events: deque[dict] = deque(maxlen=KV_EVENTS_KEPT)
        self._emit: Emit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self._pending: dict[int, pb.RequestOutput] = {}
        self._flush_scheduled = False
        self._stop = threading.Event()
        self._shut = False
        self._fatal: str | None = None
        self.rollout = LlmApiControl(self)
        try:
            self._warm_up()
        except Exception:
            self._llm.shutdown()
            raise

    @classmethod
    def from_config(cls, config: EngineConfig) -> TrtllmLlmApiEngine:
        if config.model_dir is None:
            raise EngineError("the trtllm engine needs --model-id CHECKPOINT_OR_ENGINE_DIR")
        s = config.settings
        unread = ignored_settings(s, ENGINE_DIR_ONLY)
        if unread:
            log.warning("%s only apply to an engine directory: ignored", ", ".join(unread))
        return cls(
            config.model_dir,
            LlmApiSettings(
                max_batch_size=s.max_batch_size,
                max_input_tokens=s.max_input_tokens,
                max_total_tokens=s.max_total_tokens,
                max_num_tokens=s.max_num_tokens,
                kv_cache_free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
                enable_kv_block_reuse=s.enable_kv_block_reuse,
                tensor_parallel_size=s.tensor_parallel_size,
                pipeline_parallel_size=s.pipeline_parallel_size,
                kv_event_buffer_size=s.kv_event_buffer_size,
                guided_decoding_backend=s.guided_decoding_backend,
                rl_hooks=s.rl_hooks,
                tokenizer_dir=config.tokenizer_dir,
            ),
        )

    def _warm_up(self) -> None:
        """One 1-token request before serving: the KV cache size is known only from iteration
        stats (kvCacheStats), and a broken model fails the load, not the first request."""
        started = time.monotonic()
        sp = self._SamplingParams(max_tokens=1, top_k=1, end_id=-1, detokenize=False)
        try:
            # generate_async(inputs, sampling_params, streaming=False).result(timeout): llm.py,
            # result.py.
            self._llm.generate_async([0], sampling_params=sp).result(timeout=WARMUP_TIMEOUT_S)
        except Exception as e:
            raise EngineError(f"the warm-up request failed in TensorRT-LLM: {e}") from None
        deadline = time.monotonic() + 2.0
        while not self._snapshot.kv[0] and time.monotonic() < deadline:
            self._poll_stats(timeout=0.1)
        if self._snapshot.kv[0]:
            log.info("warm-up done in %.1f s", time.monotonic() - started)
        else:
            log.warning("no KV cache stats after the warm-up: the router gets no token budget")

    # -- Engine interface -----------------------------------------------------------------------

    def info(self) -> EngineInfo:
        with self._lock:
            max_blocks, _, _, per_block = self._snapshot.kv
        s = self.settings
        device = (
            "cuda"
            if self.world_size == 1
            else f"cuda x{self.world_size} (tp {s.tensor_parallel_size}, "
            f"pp {s.pipeline_parallel_size})"
        )
        return EngineInfo(
            model_id=self.model_id,
            engine="trtllm",
            dtype=self.checkpoint.dtype,
            device=device,
            vocab_size=self.checkpoint.vocab_size,
            eos_token_ids=list(self.eos_ids),
            limits=self.limits,
            kv_capacity_tokens=max_blocks * per_block,
            features=claimed_features(
                logprobs=True,  # SamplingParams(logprobs=1)
                seed=True,
                top_k=True,
                top_p=True,
                repetition_penalty=True,
                frequency_penalty=True,
                presence_penalty=True,
                stop_token_ids=True,  # SamplingParams(stop_token_ids=)
                guided_decoding=s.guided_decoding_backend != "none",
                min_new_tokens=True,  # SamplingParams(min_tokens=)
                logit_bias=True,  # SamplingParams(embedding_bias=)
                ignore_eos=True,  # SamplingParams(ignore_eos=)
                # SamplingParams(return_context_logits=True): the PyTorch backend gathers a
                # request's context logits when it asks (_torch/pyexecutor/py_executor.py
                # _forward_step: any(r.py_return_context_logits ...)), and the result keeps them
                # (executor/result.py _handle_response -> GenerationResult.context_logits).
                prompt_logprobs=True,
            ),
        )

    def start(self, emit: Emit) -> None:
        self._emit = emit
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._loop_thread = threading.Thread(target=run, name="trtllm-llmapi", daemon=True)
        self._loop_thread.start()
        ready.wait(10)
        self._poller = threading.Thread(target=self._poll, name="trtllm-stats", daemon=True)
        self._poller.start()

    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        errors = pb.IterationOutput()
        ready: list[tuple[pb.GenerateRequest, object]] = []
        for r in requests:
            err = check_request(r, self.limits)
            sp = None
            if err is None:
                try:
                    sp = self._sampling_params(r)
                except (RequestMappingError, TypeError, ValueError) as e:
                    err = f"TensorRT-LLM refused the request's parameters: {e}"
            if err is None:
                ready.append((r, sp))
            else:
                add_finished(errors, r.id, pb.FINISH_REASON_ERROR, err)
        with self._lock:
            self.counters.requests_received += len(requests)
            self.counters.requests_failed += len(errors.outputs)
            asleep = self.rollout.refusal()
            if self._shut or self._fatal or self._loop is None or asleep:
                reason = self._fatal or asleep or "the executor is shutting down"
                for r, _ in ready:
                    add_finished(errors, r.id, pb.FINISH_REASON_ERROR, reason)
                self.counters.requests_failed += len(ready)
                ready = []
            for r, _ in ready:
                if r.id in self.live:
                    add_finished(errors, r.id, pb.FINISH_REASON_ERROR, "id already in flight")
                    self.counters.requests_failed += 1
            ready = [(r, sp) for r, sp in ready if r.id not in self.live]
            for r, _ in ready:
                live = LiveRequest(
                    r.id,
                    eos=frozenset() if r.ignore_eos else frozenset(self.eos_ids),
                    stop=frozenset(r.stop_token_ids),
                    logprobs=r.return_logprobs,
                    prompt=list(r.input_ids) if r.return_prompt_logprobs else None,
                    prompt_len=len(r.input_ids),
                )
                self.live.add(r.id, live)
        if ready:
            self._loop.call_soon_threadsafe(self._launch, ready)
        if errors.outputs and self._emit is not None:
            self._emit(errors)

    def _sampling_params(self, r: pb.GenerateRequest):
        kw = sampling_kwargs(
            r, self.eos_ids, self.settings.guided_decoding_backend, self.checkpoint.vocab_size
        )
        # CompletionOutput.request_perf_metrics (result.py `_handle_sequence`): its reused KV
        # blocks are the first output's cached_tokens (trtllm_engine.cached_from_reused_blocks).
        kw["return_perf_metrics"] = self.settings.enable_kv_block_reuse
        guide = kw.pop("guided_decoding", None)
        if guide is not None:
            from tensorrt_llm.llmapi import GuidedDecodingParams  # sampling_params.py

            field, text = guide
            kw["guided_decoding"] = GuidedDecodingParams(**{field: text})
        return self._SamplingParams(**kw)

    def cancel(self, request_ids: list[int]) -> None:
        batch = pb.IterationOutput()
        with self._lock:
            cancelled = self.live.cancel(request_ids, batch)
        for _, live in cancelled:
            if live.result is not None and self._loop is not None:
                # GenerationResult.abort() -> executor.abort_request (result.py); its later
                # steps are dropped: the request is no longer live.
                self._loop.call_soon_threadsafe(_abort, live.result)
        if batch.outputs and self._emit is not None:
            self._emit(batch)

    # -- the loop thread ------------------------------------------------------------------------

    def _launch(self, ready: list) -> None:
        errors = pb.IterationOutput()
        for r, sp in ready:
            with self._lock:
                live = self.live.get(r.id)
            if live is None:
                continue  # cancelled before it started
            try:
                # generate_async(inputs, sampling_params, streaming=True): llm.py.
                result = self._llm.generate_async(
                    list(r.input_ids), sampling_params=sp, streaming=True
                )
            except Exception as e:
                with self._lock:
                    self.live.fail(r.id, f"TensorRT-LLM refused the request: {e}", errors)
                continue
            live.result = result
            with self._lock:
                cancelled = self.live.get(r.id) is not live
            if cancelled:  # cancelled while generate_async ran: cancel() saw no result yet
                _abort(result)
                continue
            asyncio.get_running_loop().create_task(self._pump(live))
        if errors.outputs and self._emit is not None:
            self._emit(errors)

    async def _pump(self, live: LiveRequest) -> None:
        result = live.result
        try:
            async for step in result:  # result.py __anext__: one executor response
                if not self._read(live, step):
                    if self.live.get(live.rid) is not live and not step.finished:
                        _abort(step)
                    return
        except Exception as e:
            with self._lock:
                out = self._pending_output(live.rid)
                if self.live.get(live.rid) is live:
                    out.finish_reason = pb.FINISH_REASON_ERROR
                    out.error = f"TensorRT-LLM failed the request: {e}"
                    self.live.finish(live.rid, pb.FINISH_REASON_ERROR)
            self._schedule_flush()

    def _read(self, live: LiveRequest, step) -> bool:
        """Takes one step's new tokens into the pending output; False once the request is over
        (finished, failed, or no longer live)."""
        output = step.outputs[0]
        with self._lock:
            if self.live.get(live.rid) is not live:
                return False
            tokens = list(output.token_ids[live.tokens_read :])
            out = self._pending_output(live.rid)
            if live.first and (tokens or step.finished):
                live.first = False
                out.cached_tokens = cached_from_reused_blocks(
                    getattr(output, "request_perf_metrics", None),
                    self._snapshot.kv[3],
                    live.prompt_len,
                )
            if live.prompt is not None and (tokens or step.finished):
                if not self._add_prompt_logprobs(out, live, step):
                    return False
            if tokens and live.logprobs:
                values = new_logprobs(list(output.logprobs or []), tokens, live.tokens_read)
                if values is None:
                    out.finish_reason = pb.FINISH_REASON_ERROR
                    out.error = (
                        f"TensorRT-LLM returned no log probability for some of {len(tokens)} "
                        "token(s) of a request that asked for them; the request is ended rather "
                        "than report values the engine did not produce"
                    )
                    self.live.finish(live.rid, pb.FINISH_REASON_ERROR)
                    self._schedule_flush()
                    return False
                out.logprobs.extend(values)
            out.token_ids.extend(tokens)
            live.tokens_read += len(tokens)
            self.counters.tokens_generated += len(tokens)
            done = step.finished
            if done:
                reason, error = finish_reason(output, live)
                out.finish_reason = reason
                out.error = error
                self.live.finish(live.rid, reason)
        self._schedule_flush()
        return not done

    def _add_prompt_logprobs(self, out: pb.RequestOutput, live: LiveRequest, step) -> bool:
        """Under the lock, with the request's first tokens: its prompt's log probabilities from
        the result's context logits ([prompt tokens, vocab]). False when they are missing: the
        request is failed (and aborted by the caller)."""
        from tensorgate.executor.engines.prompt_logprobs import from_logits
        from tensorgate.executor.engines.trtllm_engine import _logits_device

        assert live.prompt is not None
        try:
            prompt = from_logits(
                getattr(step, "context_logits", None),
                live.prompt,
                0,
                self.checkpoint.vocab_size,
                _logits_device(),
            )
        except (ValueError, RuntimeError) as e:
            out.finish_reason = pb.FINISH_REASON_ERROR
            out.error = f"TensorRT-LLM returned no usable prompt logits: {e}"
            self.live.finish(live.rid, pb.FINISH_REASON_ERROR)
            self._schedule_flush()
            return False
        prompt.add_to(out, 0)
        live.prompt = None
        return True

    def _pending_output(self, rid: int) -> pb.RequestOutput:
        out = self._pending.get(rid)
        if out is None:
            out = self._pending[rid] = pb.RequestOutput(request_id=rid)
        return out

    def _schedule_flush(self) -> None:
        # Everything that arrives in this loop turn goes out together.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        with self._lock:
            pending, self._pending = self._pending, {}
            if pending:
                self.counters.iterations += 1
        outputs = [o for o in pending.values() if o.token_ids or o.finish_reason]
        if outputs and self._emit is not None:
            batch = pb.IterationOutput()
            batch.outputs.extend(outputs)
            self._emit(batch)

    # -- stats and KV events --------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.wait(STATS_POLL_S):
            self._poll_stats(timeout=0.05)
            self._poll_kv_events()

    def _poll_stats(self, timeout: float) -> None:
        try:
            # get_stats(timeout) -> list of per-iteration dicts (llm.py; the C++ IterationStats
            # JSON names, as trtllm-serve's /metrics shows them).
            stats = self._llm.get_stats(timeout=timeout)
        except Exception as e:
            log.debug("get_stats failed: %s", e)
            return
        if not stats:
            return
        # Dicts, or their JSON text (the docstring of LLM.get_stats shows strings).
        last = _as_dict(stats[-1])
        kv = last.get("kvCacheStats") or {}
        ifb = last.get("inflightBatchingStats") or {}
        with self._lock:
            if kv:
                self._snapshot.kv = (
                    int(kv.get("maxNumBlocks", 0)),
                    int(kv.get("usedNumBlocks", 0)),
                    int(kv.get("freeNumBlocks", 0)),
                    int(kv.get("tokensPerBlock", 0)),
                )
            self._snapshot.queued = int(last.get("numQueuedRequests", 0) or 0)
            self._snapshot.paused = int(ifb.get("numPausedRequests", 0) or 0)
            if last.get("iterLatencyMS") is not None:
                self.counters.last_iteration_ms = float(last["iterLatencyMS"])

    def _poll_kv_events(self) -> None:
        if not self.settings.kv_event_buffer_size:
            return
        try:
            # get_kv_cache_events(timeout) -> list of event dicts (llm.py; the shape is
            # KVCacheEventSerializer's, tensorrt_llm/_utils.py).
            events = self._llm.get_kv_cache_events(timeout=0.05)
        except Exception as e:
            log.debug("get_kv_cache_events failed: %s", e)
            return
        if events:
            with self._lock:
                self._kv_events.extend(_as_dict(e) for e in events)

    def kv_cache_events(self, max_events: int | None = None) -> list[dict]:
        """Drains the KV-cache events collected so far (oldest first), each as TensorRT-LLM
        reports it: `{"event_id", "data": {"type": "stored" | "removed" | "created" |
        "updated", ...}, "window_size"}`. Empty unless --kv-event-buffer-size is set. For
        KV-aware routing: the contract does not carry them yet."""
        self._poll_kv_events()
        with self._lock:
            n = len(self._kv_events)
            if max_events is not None:
                n = min(n, max_events)
            return [self._kv_events.popleft() for _ in range(n)]

    def kv_cache_event_batch(self) -> pb.KvCacheEventBatch | None:
        """The contract's form of `kv_cache_events()`; None unless --kv-event-buffer-size
        asked TensorRT-LLM to publish them."""
        if not self.settings.kv_event_buffer_size:
            return None
        return batch_from_trtllm(self.kv_cache_events())

    def scheduling(self) -> tuple[int, int, int]:
        """(running, paused, queued) as of the last iteration stats."""
        with self._lock:
            live = len(self.live)
            queued = min(self._snapshot.queued, live)
            paused = min(self._snapshot.paused, live - queued)
            return live - queued - paused, paused, queued

    def stats(self) -> pb.StatsResponse:
        with self._lock:
            live = len(self.live)
            queued = min(self._snapshot.queued, live)
            _, used, free, per_block = self._snapshot.kv
            return self.counters.to_proto(
                active=live - queued,
                queued=queued,
                blocks_used=used,
                blocks_free=free,
                block_size=per_block,
            )

    # -- rollout control (trtllm_llmapi_control.py) ---------------------------------------------

    def control_features(self) -> ControlFeatures:
        return self.rollout.features()

    def released_memory_tags(self) -> list[str]:
        return sorted(self.rollout.released)

    def release_memory(self, tags: list[str]) -> ControlResult:
        return self.rollout.release(tags)

    def resume_memory(self, tags: list[str]) -> ControlResult:
        return self.rollout.resume(tags)

    def update_weights(self, request: pb.UpdateWeightsRequest) -> ControlResult:
        return self.rollout.update(request)

    def flush_cache(self) -> ControlResult:
        return self.rollout.flush()

    def pause_generation(self) -> ControlResult:
        return self.rollout.pause()

    def continue_generation(self) -> ControlResult:
        return self.rollout.resume_generation()

    def end_live(self, message: str) -> None:
        """Ends every live request with `message` and aborts it in TensorRT-LLM."""
        batch = pb.IterationOutput()
        with self._lock:
            failed = self.live.fail_all(message, batch)
        if batch.outputs and self._emit is not None:
            self._emit(batch)
        if self._loop is not None:
            for _, live in failed:
                if live.result is not None:
                    self._loop.call_soon_threadsafe(_abort, live.result)

    # -- health, shutdown -----------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, self._fatal
        if self._shut:
            return False, "shutting down"
        if self._loop_thread is not None and not self._loop_thread.is_alive():
            return False, "the TensorRT-LLM request loop has stopped"
        return True, ""

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        self._stop.set()
        batch = pb.IterationOutput()
        with self._lock:
            failed = self.live.fail_all("the executor is shutting down", batch)
        if batch.outputs and self._emit is not None:
            self._emit(batch)
        if self._loop is not None:
            for _, live in failed:
                if live.result is not None:
                    self._loop.call_soon_threadsafe(_abort, live.result)
        try:
            self._llm.shutdown()  # llm.py BaseLLM.shutdown
        except Exception as e:
            log.warning("TensorRT-LLM shutdown failed: %s", e)
        if self._loop is not None and self._loop_thread is not None:
            # The request tasks end with the loop (their requests have ended above).
            done = asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop)
            try:
                done.result(timeout=5)
            except Exception as e:
                log.debug("request tasks did not end: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=5)
            if not self._loop_thread.is_alive():
                self._loop.close()
        if self._poller is not None:
            self._poller.join(timeout=5)


def _as_dict(item: object) -> dict:
    if isinstance(item, str | bytes):
        item = json.loads(item)
    return item if isinstance(item, dict) else {}


async def _cancel_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _abort(result) -> None:
    try:
        result.abort()
    except Exception as e:
        log.debug("abort failed: %s", e)
