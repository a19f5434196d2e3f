"""The TensorRT-LLM engine: `tensorrt_llm.bindings.executor.Executor` over a precompiled engine
directory (built by `trtllm-build`, `optimum-cli export trtllm` or scripts/build-engine).

Every TensorRT-LLM name used here is the one its Python bindings define; the source of each is
cited next to its use and listed in docs/trtllm.md ("TRT-LLM" below is NVIDIA/TensorRT-LLM,
`cpp/tensorrt_llm/nanobind/executor/`, which replaced the same-named `pybind/` files in 1.x).
This engine is tested against a test double of those bindings (backends/trtllm/tests/doubles),
not on a GPU.

Threads: `submit` and `cancel` run on the server's thread and call `enqueue_requests` /
`cancel_request` directly (the executor is thread-safe); ONE consumer thread blocks in
`await_responses(timeout)`, and turns everything that call returned into one IterationOutput:
O(engine steps) messages. TensorRT-LLM's own request ids are mapped to the server's ids.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tensorgate.executor.control import ControlUnsupported
from tensorgate.executor.engine import (
    Emit,
    Engine,
    EngineError,
    EngineFeatures,
    EngineInfo,
    EngineLimits,
    add_finished,
    check_request,
)
from tensorgate.executor.engines.trtllm_config import (
    LimitOverrides,
    TrtllmEngineConfig,
    check_gpus,
    load_engine_config,
    visible_gpu_count,
)
from tensorgate.executor.live_requests import LiveRequests
from tensorgate.executor.settings import (
    DEFAULT_CAPACITY_SCHEDULER_POLICY,
    DEFAULT_FREE_GPU_MEMORY_FRACTION,
    DEFAULT_KV_BLOCK_REUSE,
    EngineConfig,
    ExecutorSettings,
    SettingError,
    check_setting,
)
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.trtllm")

RELEASE_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release"
MISSING_TRTLLM = (
    "the trtllm engine needs TensorRT-LLM, which is not installed in this Python ({error}). "
    "TensorRT-LLM is not installable from PyPI alone: run tensorgate in the container built from "
    f"this repository's Dockerfile_trtllm (based on NVIDIA's {RELEASE_IMAGE}:<tag> image), e.g. "
    "`docker build -f Dockerfile_trtllm -t tensorgate-trtllm . && docker run --gpus all "
    "--shm-size 1g -p 3000:3000 -v $MODELS:/models tensorgate-trtllm tensorgate serve "
    "--engine trtllm --model-id /models/<checkpoint or engine dir>`, or install tensorgate inside "
    f"{RELEASE_IMAGE}:<tag>. See docs/trtllm.md."
)

# A migrated request (GenerateRequest.resumed_tokens > 0) continues here as a new TensorRT-LLM
# request whose input is the prompt plus the tokens generated before. Greedy decoding continues
# exactly. Presence and frequency penalties already count the resumed tokens: TensorRT-LLM
# counts every token of the sequence, the input included (SamplingConfig prompt_ignore_length,
# whose C++ default 0 ignores none of the prompt). A seed cannot continue: SamplingConfig(seed=)
# (request.cpp) seeds the request's sampler once, at its first step, and nothing in
# SamplingConfig or Request offsets it, so a resumed request would draw another stream than the
# one it left. Such a request fails rather than continue differently.
SEEDED_RESUME = (
    "seeded sampling cannot continue after a migration on TensorRT-LLM: its sampler is seeded "
    "at a request's first step (SamplingConfig seed) and cannot start at step N"
)

AWAIT_TIMEOUT = datetime.timedelta(milliseconds=100)
WARMUP_TIMEOUT_S = 600.0

_UNFINISHED = pb.FINISH_REASON_UNSPECIFIED


def import_bindings() -> ModuleType:
    """`tensorrt_llm.bindings.executor`, or an EngineError that says which image to use."""
    try:
        import tensorrt_llm.bindings.executor as trtllm
    except ImportError as e:
        # Also a TensorRT-LLM whose native libraries (libmpi, libnvinfer, CUDA) do not load.
        raise EngineError(MISSING_TRTLLM.format(error=f"{type(e).__name__}: {e}")) from None
    return trtllm


@dataclass(frozen=True)
class TrtllmSettings:
    """Engine settings; None means "as the engine was built"."""

    max_batch_size: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    # KvCacheConfig(free_gpu_memory_fraction=...): share of the GPU memory left after loading
    # the weights that the paged KV cache takes.
    kv_cache_free_gpu_memory_fraction: float = DEFAULT_FREE_GPU_MEMORY_FRACTION
    # KvCacheConfig(enable_block_reuse=...): prefix caching across requests.
    enable_kv_block_reuse: bool = DEFAULT_KV_BLOCK_REUSE
    capacity_scheduler_policy: str = DEFAULT_CAPACITY_SCHEDULER_POLICY
    # Where to read eos/pad ids (generation_config.json, config.json); default: engine dir.
    tokenizer_dir: Path | None = None
    eos_token_ids: tuple[int, ...] | None = None


@dataclass
class _Live:
    """One request in flight: its server id, what ends it, what it asked for."""

    rid: int
    end_id: int  # -1: none
    eos: frozenset[int]
    stop: frozenset[int]
    logprobs: bool
    max_new: int
    tid: int = -1  # TensorRT-LLM's id, once enqueued
    prompt: list[int] | None = None  # the prompt, until its log probabilities have been sent
    generated: int = 0
    last_token: int = -1
    prompt_len: int = 0
    first: bool = True  # its first result (which reports the prompt's cached tokens) is to come


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value] if value >= 0 else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return []


def special_ids(engine_dir: Path, tokenizer_dir: Path | None) -> tuple[list[int], int | None]:
    """eos ids and pad id of the model: generation_config.json, then the checkpoint's
    config.json (a TensorRT-LLM engine config.json has neither). scripts/build-engine copies
    generation_config.json into the engine directory."""
    eos: list[int] = []
    pad: int | None = None
    for d in (tokenizer_dir, engine_dir):
        if d is None or not Path(d).is_dir():
            continue
        for name in ("generation_config.json", "config.json"):
            data = _read_json(Path(d) / name)
            if not eos:
                eos = _ids(data.get("eos_token_id"))
            if pad is None:
                p = _ids(data.get("pad_token_id"))
                pad = p[0] if p else None
        if eos:
            break
    return eos, pad


class TrtllmEngine(Engine):
    def __init__(
        self,
        engine_dir: Path,
        settings: TrtllmSettings | None = None,
        *,
        gpu_count: Callable[[], int] = visible_gpu_count,
    ) -> None:
        super().__init__()
        s = settings or TrtllmSettings()
        try:
            # The same checks as the command line's (settings.py), for settings built in code.
            for name in ("capacity_scheduler_policy", "kv_cache_free_gpu_memory_fraction"):
                check_setting(name, getattr(s, name))
        except SettingError as e:
            raise EngineError(str(e)) from None
        self.config: TrtllmEngineConfig = load_engine_config(Path(engine_dir))
        # Chunked context is on whenever the engine can run it: the executor turns it off
        # (with a warning only) unless paged context FMHA is built in (executorImpl.cpp,
        # checkOptionalParams), so asking for it on another engine would change nothing.
        self.chunked_context = self.config.paged_context_fmha
        if s.capacity_scheduler_policy == "max_utilization" and not self.chunked_context:
            # executorImpl.cpp fetchNewRequests: a streaming request under a policy that may
            # evict fails unless chunked context is on (or prompt + max_new - 1 fits the input
            # limit). tensorgate always streams.
            raise EngineError(
                "--capacity-scheduler-policy max_utilization needs chunked context, and the "
                f"engine in {engine_dir} was built without paged context FMHA "
                "(build_config.plugin_config.use_paged_context_fmha), so TensorRT-LLM would fail "
                "most streaming requests; use guaranteed_no_evict or rebuild with "
                "--use_paged_context_fmha enable"
            )
        self.limits: EngineLimits = self.config.limits(
            LimitOverrides(s.max_batch_size, s.max_input_tokens, s.max_total_tokens),
            chunked_context=self.chunked_context,
        )
        # TensorRT-LLM first: on a machine without it, that is the error worth reading.
        trtllm = import_bindings()
        check_gpus(self.config, gpu_count)
        self._t = trtllm
        self.model_id = str(engine_dir)

        eos, pad = special_ids(self.config.engine_dir, s.tokenizer_dir)
        if s.eos_token_ids is not None:
            eos = list(s.eos_token_ids)
        if not eos:
            log.warning(
                "no eos_token_id found (generation_config.json in %s%s): requests end only at "
                "max_new_tokens or a stop token; pass --tokenizer-name with the checkpoint",
                self.config.engine_dir,
                f" or {s.tokenizer_dir}" if s.tokenizer_dir else "",
            )
        self.eos_ids = eos
        self.pad_id = pad if pad is not None else (eos[0] if eos else None)
        # Prefix reuse on: each request asks for its perf metrics, for its reused KV blocks.
        self.block_reuse = s.enable_kv_block_reuse

        # ExecutorConfig / SchedulerConfig / KvCacheConfig / CapacitySchedulerPolicy:
        # TRT-LLM executorConfig.cpp and bindings.cpp. max_beam_width=1: no beam search.
        policy = {
            "guaranteed_no_evict": trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
            "max_utilization": trtllm.CapacitySchedulerPolicy.MAX_UTILIZATION,
        }[s.capacity_scheduler_policy]
        executor_config = trtllm.ExecutorConfig(
            max_beam_width=1,
            # ExecutorConfig(enable_chunked_context=): executorConfig.cpp; see above.
            enable_chunked_context=self.chunked_context,
            scheduler_config=trtllm.SchedulerConfig(capacity_scheduler_policy=policy),
            kv_cache_config=trtllm.KvCacheConfig(
                enable_block_reuse=s.enable_kv_block_reuse,
                free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
            ),
            # Only a tighter limit than the engine's is passed; None keeps the engine's.
            max_batch_size=(
                self.limits.max_batch_size
                if self.limits.max_batch_size < self.config.max_batch_size
                else None
            ),
        )
        log.info(
            "loading TensorRT-LLM engine %s (%s, %s, tp %d pp %d)",
            engine_dir,
            self.config.architecture,
            self.config.dtype,
            self.config.mapping.tp_size,
            self.config.mapping.pp_size,
        )
        try:
            # Executor(model_path, model_type, executor_config): TRT-LLM executor.cpp.
            self._executor = trtllm.Executor(
                Path(engine_dir), trtllm.ModelType.DECODER_ONLY, executor_config
            )
        except Exception as e:  # the bindings raise RuntimeError for any C++ exception
            raise EngineError(
                f"TensorRT-LLM could not load the engine in {engine_dir}: {e}"
            ) from None
        # In MPI leader mode only rank 0 takes requests (can_enqueue_requests: executor.cpp).
        self.is_leader = bool(self._executor.can_enqueue_requests())

        self._lock = threading.Lock()  # guards the live table, the counters and the stats
        # Server id -> state, and TensorRT-LLM's id -> server id.
        self.live: LiveRequests[_Live] = LiveRequests(self.counters)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._emit: Emit | None = None
        self._fatal: str | None = None
        self._kv = (0, 0, 0, 0)  # max, used, free blocks, tokens per block
        self._queued = 0
        self._paused = 0
        self._engine_latency = False
        self._shut = False
        if self.is_leader:
            self._warm_up()

    def _warm_up(self) -> None:
        """Runs one 1-token request before serving. TensorRT-LLM reports its KV cache (the
        blocks it allocated) only in iteration stats, so without a first iteration Info would
        carry no KV capacity and the router no token budget to admit requests against. It also
        pays the first request's one-off costs before a client does, and a broken engine fails
        the load rather than the first request."""
        started = time.monotonic()
        log.info("warming up: one 1-token request, to learn the KV cache size")
        try:
            self._await_warm_up(started + WARMUP_TIMEOUT_S)
        except Exception as e:
            # Not serving after all: the executor's threads must not keep the process alive.
            self._executor.shutdown()
            if isinstance(e, EngineError):
                raise
            raise EngineError(f"the warm-up request failed in TensorRT-LLM: {e}") from None
        # The iteration's stats may land just after its response.
        stats_deadline = time.monotonic() + 2.0
        while True:
            self._refresh_stats()
            max_blocks, _, _, per_block = self._kv
            if max_blocks or time.monotonic() > stats_deadline:
                break
            time.sleep(0.05)
        if max_blocks:
            log.info(
                "warm-up done in %.1f s: KV cache of %d blocks x %d tokens",
                time.monotonic() - started,
                max_blocks,
                per_block,
            )
        else:
            log.warning("no KV cache stats after the warm-up: the router gets no token budget")

    def _await_warm_up(self, deadline: float) -> None:
        t = self._t
        try:
            tid = self._executor.enqueue_request(
                t.Request(
                    input_token_ids=[0],
                    max_tokens=1,
                    streaming=False,
                    sampling_config=t.SamplingConfig(1, top_k=1),
                )
            )
        except Exception as e:
            raise EngineError(f"TensorRT-LLM refused the warm-up request: {e}") from None
        while True:
            # await_responses(id, timeout): executor.cpp.
            responses = self._executor.await_responses(tid, timeout=AWAIT_TIMEOUT)
            failed = next((r for r in responses if r.has_error()), None)
            if failed is not None:
                raise EngineError(f"the warm-up request failed in TensorRT-LLM: {failed.error_msg}")
            if any(r.result.is_final for r in responses):
                return
            if time.monotonic() > deadline:
                raise EngineError(f"the warm-up request did not finish in {WARMUP_TIMEOUT_S:.0f} s")

    @classmethod
    def from_config(cls, config: EngineConfig) -> TrtllmEngine:
        if config.model_dir is None:
            raise EngineError("the trtllm engine needs --model-id ENGINE_DIR")
        s = config.settings
        unread = ignored_settings(s, CHECKPOINT_ONLY)
        if unread:
            log.warning(
                "%s only apply to a Hugging Face checkpoint (the LLM API); an engine directory "
                "fixes them at build time: ignored",
                ", ".join(unread),
            )
        engine = cls(
            config.model_dir,
            TrtllmSettings(
                max_batch_size=s.max_batch_size,
                max_input_tokens=s.max_input_tokens,
                max_total_tokens=s.max_total_tokens,
                kv_cache_free_gpu_memory_fraction=s.kv_cache_free_gpu_memory_fraction,
                enable_kv_block_reuse=s.enable_kv_block_reuse,
                capacity_scheduler_policy=s.capacity_scheduler_policy,
                tokenizer_dir=config.tokenizer_dir,
            ),
        )
        if not engine.is_leader:
            engine.run_worker_rank()
            # A worker rank never serves gRPC: rank 0 does. Exit cleanly once it is done.
            raise SystemExit(0)
        return engine

    def run_worker_rank(self) -> None:
        """MPI ranks other than 0 (leader mode): the Executor they built takes part in every
        step; `shutdown()` returns once the leader has shut down."""
        rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK") or "?"
        log.info("MPI rank %s: worker of the TensorRT-LLM executor; rank 0 serves", rank)
        self._executor.shutdown()

    # -- Engine interface -----------------------------------------------------------------------

    def info(self) -> EngineInfo:
        self._refresh_stats()
        m = self.config.mapping
        device = (
            "cuda"
            if m.world_size == 1
            else f"cuda x{m.world_size} (tp {m.tp_size}, pp {m.pp_size})"
        )
        with self._lock:
            max_blocks, _, _, per_block = self._kv
        return EngineInfo(
            model_id=self.model_id,
            engine="trtllm",
            dtype=self.config.quant_algo.lower() if self.config.quant_algo else self.config.dtype,
            device=device,
            vocab_size=self.config.vocab_size,
            eos_token_ids=list(self.eos_ids),
            limits=self.limits,
            # Known from the executor's KV cache stats once it has run an iteration.
            kv_capacity_tokens=max_blocks * per_block,
            features=claimed_features(
                logprobs=True,  # OutputConfig(return_log_probs=True), Result.log_probs
                top_n_tokens=False,  # the Result has no alternatives per position
                seed=True,  # SamplingConfig(seed=...)
                top_k=True,
                top_p=True,
                typical_p=False,  # SamplingConfig has no typical_p (request.cpp)
                repetition_penalty=True,
                frequency_penalty=True,
                presence_penalty=True,
                stop_token_ids=True,  # Request(stop_words=[[id], ...])
                guided_decoding=False,  # needs a GuidedDecodingConfig with the tokenizer
                min_new_tokens=True,  # SamplingConfig(min_tokens=)
                logit_bias=False,  # Request(embedding_bias=) takes a tensor: not wired
                ignore_eos=True,  # end_id=-1
                # OutputConfig(return_context_logits=True), Result.context_logits: only on an
                # engine built with gather_context_logits (see TrtllmEngineConfig).
                prompt_logprobs=self.config.gather_context_logits,
            ),
        )

    def start(self, emit: Emit) -> None:
        self._emit = emit
        self._thread = threading.Thread(target=self._consume, name="trtllm-responses", daemon=True)
        self._thread.start()

    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        errors = pb.IterationOutput()
        ready: list[tuple[pb.GenerateRequest, _Live, object]] = []
        for r in requests:
            err = check_request(r, self.limits)
            if err is None and r.id in self.live:
                err = f"request id {r.id} is already in flight"
            live = req = None
            if err is None:
                try:
                    live, req = self._to_trtllm(r)
                except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                    err = f"TensorRT-LLM refused the request's parameters: {e}"
            if err is None:
                ready.append((r, live, req))
            else:
                add_finished(errors, r.id, pb.FINISH_REASON_ERROR, err)
        with self._lock:
            self.counters.requests_received += len(requests)
            self.counters.requests_failed += len(errors.outputs)
            if ready:
                self._enqueue(ready, errors)
        if errors.outputs and self._emit is not None:
            self._emit(errors)

    def _enqueue(self, ready: list, errors: pb.IterationOutput) -> None:
        """Under the lock, so that the consumer never sees a TensorRT-LLM id it cannot map."""
        if self._fatal is not None or self._shut:
            reason = self._fatal or "the executor is shutting down"
            for r, _, _ in ready:
                add_finished(errors, r.id, pb.FINISH_REASON_ERROR, reason)
            self.counters.requests_failed += len(ready)
            return
        try:
            # enqueue_requests(requests) -> list of ids: TRT-LLM executor.cpp.
            trt_ids: list[int | str] = list(
                self._executor.enqueue_requests([req for _, _, req in ready])
            )
        except Exception:
            # One bad request fails the whole call: find it by enqueueing one at a time.
            trt_ids = []
            for _, _, req in ready:
                try:
                    trt_ids.append(self._executor.enqueue_request(req))
                except Exception as e:
                    trt_ids.append(f"TensorRT-LLM refused the request: {e}")
        for (r, live, _), tid in zip(ready, trt_ids, strict=True):
            if isinstance(tid, str):
                add_finished(errors, r.id, pb.FINISH_REASON_ERROR, tid)
                self.counters.requests_failed += 1
                continue
            live.tid = tid
            self.live.add(r.id, live, engine_id=tid)

    def _to_trtllm(self, r: pb.GenerateRequest) -> tuple[_Live, object]:
        t = self._t
        s = r.sampling
        kwargs: dict[str, object] = {}
        if s.do_sample:
            # TensorRT-LLM samples greedily when top_k and top_p are both unset (its C++
            # defaults are 0): top_p=1.0 keeps full-distribution sampling.
            kwargs["temperature"] = s.temperature if s.temperature > 0 else 1.0
            kwargs["top_p"] = s.top_p if 0.0 < s.top_p <= 1.0 else 1.0
            if s.top_k > 0:
                kwargs["top_k"] = s.top_k
            if s.HasField("seed"):
                if r.resumed_tokens:
                    raise ValueError(SEEDED_RESUME)
                kwargs["seed"] = s.seed
        else:
            kwargs["top_k"] = 1  # greedy
        if s.typical_p and s.typical_p < 1.0:
            raise ValueError("typical_p is not supported by TensorRT-LLM's SamplingConfig")
        # Fields of the structured-output contract, when it has them: min_new_tokens is
        # SamplingConfig(min_tokens=) (request.cpp); a grammar or a logit bias is refused here
        # rather than run unenforced (the LLM API flavour, a checkpoint, does both).
        fields = pb.GenerateRequest.DESCRIPTOR.fields_by_name
        if "min_new_tokens" in fields and r.min_new_tokens:
            kwargs["min_tokens"] = r.min_new_tokens
        if "grammar" in fields and r.HasField("grammar"):
            raise ValueError(
                "a grammar is not supported on an engine directory; serve the Hugging Face "
                "checkpoint with --guided-decoding-backend instead"
            )
        if "logit_bias" in fields and len(r.logit_bias):
            raise ValueError("logit_bias is not supported on an engine directory")
        if s.repetition_penalty and s.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = s.repetition_penalty
        if s.frequency_penalty:
            kwargs["frequency_penalty"] = s.frequency_penalty
        if s.presence_penalty:
            kwargs["presence_penalty"] = s.presence_penalty
        # SamplingConfig(beam_width, *, top_k, top_p, seed, temperature, ...): request.cpp.
        sampling = t.SamplingConfig(1, **kwargs)

        stop = frozenset(r.stop_token_ids)
        eos = frozenset() if r.ignore_eos else frozenset(self.eos_ids)
        # One end id; every other eos id and every stop id is a one-token stop word.
        end_id = -1 if r.ignore_eos or not self.eos_ids else self.eos_ids[0]
        words = sorted((eos | stop) - {end_id})
        live = _Live(r.id, end_id, eos, stop, r.return_logprobs, r.max_new_tokens)
        live.prompt_len = len(r.input_ids)
        if r.return_prompt_logprobs:
            if not self.config.gather_context_logits:
                raise ValueError(
                    "return_prompt_logprobs needs an engine built with gather_context_logits "
                    "(trtllm-build --gather_context_logits): the prompt's log probabilities come "
                    "from its context logits"
                )
            live.prompt = list(r.input_ids)
        # Request(input_token_ids, max_tokens, *, streaming, sampling_config, output_config,
        # end_id, pad_id, stop_words, ...): request.cpp. end_id=-1 disables the end token, as
        # TensorRT-LLM's own LLM API does for ignore_eos (tensorrt_llm/executor/base_worker.py).
        req = t.Request(
            input_token_ids=list(r.input_ids),
            max_tokens=r.max_new_tokens,
            streaming=True,
            sampling_config=sampling,
            # OutputConfig(return_log_probs, return_context_logits, ...): request.cpp.
            output_config=t.OutputConfig(
                return_log_probs=r.return_logprobs,
                return_context_logits=r.return_prompt_logprobs,
                # Result.request_perf_metrics (request.cpp), set on every result of a request
                # that asks (LlmRequest::createResult, llmRequest.cpp): its reused KV blocks
                # are the first output's cached_tokens.
                return_perf_metrics=self.block_reuse,
            ),
            end_id=end_id,
            pad_id=self.pad_id if self.pad_id is not None else None,
            stop_words=[[w] for w in words] or None,
            # Request(priority=) in [0, 1], default 0.5, higher first (request.cpp; the
            # executor queues in priority order: executorImpl.cpp insertRequestInOrder).
            priority=trtllm_priority(r.priority),
        )
        return live, req

    def cancel(self, request_ids: list[int]) -> None:
        batch = pb.IterationOutput()
        with self._lock:
            # Later responses for these (CANCELLED, or tokens already in flight) are dropped:
            # their TensorRT-LLM ids no longer map to a live request.
            for _, live in self.live.cancel(request_ids, batch):
                self._cancel_in_trtllm(live.tid)
        if batch.outputs and self._emit is not None:
            self._emit(batch)

    # -- the consumer thread ----------------------------------------------------------------------

    def _consume(self) -> None:
        emit = self._emit
        assert emit is not None
        while not self._stop.is_set():
            try:
                # await_responses(timeout) -> every response ready now: executor.cpp.
                responses = self._executor.await_responses(timeout=AWAIT_TIMEOUT)
            except Exception as e:
                if self._stop.is_set():
                    return
                self._fatal = f"the TensorRT-LLM executor failed: {e}"
                log.error("%s", self._fatal)
                self._fail_all(self._fatal)
                return
            if not responses:
                continue
            started = time.monotonic()
            batch = self._coalesce(responses)
            if batch.outputs:
                emit(batch)
            with self._lock:
                self.counters.iterations += 1
                if not self._engine_latency:
                    # Until the executor's own iteration latency is known (stats), the time
                    # this loop spent on the batch.
                    self.counters.last_iteration_ms = (time.monotonic() - started) * 1000

    def _coalesce(self, responses: list) -> pb.IterationOutput:
        """All responses of one await, as one message with one output per request."""
        batch = pb.IterationOutput()
        outs: dict[int, pb.RequestOutput] = {}
        with self._lock:
            c = self.counters
            for resp in responses:
                rid = self.live.rid_of(resp.request_id)
                if rid is None:
                    if resp.has_error():
                        log.warning(
                            "error for unknown request %s: %s", resp.request_id, resp.error_msg
                        )
                    continue  # cancelled, or not ours
                live = self.live.get(rid)
                assert live is not None
                out = outs.get(rid)
                if out is None:
                    out = outs[rid] = batch.outputs.add(request_id=rid)
                if resp.has_error():
                    out.finish_reason = pb.FINISH_REASON_ERROR
                    out.error = resp.error_msg or "TensorRT-LLM reported an error"
                    self.live.finish(rid, pb.FINISH_REASON_ERROR)
                    continue
                result = resp.result
                if live.first:
                    live.first = False
                    out.cached_tokens = self._cached_tokens(result, live.prompt_len)
                if live.prompt is not None and not self._add_prompt_logprobs(out, live, result):
                    continue
                new = list(result.output_token_ids[0]) if result.output_token_ids else []
                if live.logprobs and new:
                    logprobs = _new_logprobs(result, live.generated, len(new))
                    if len(logprobs) < len(new):
                        self._fail_short_logprobs(out, live, len(logprobs), new)
                        continue
                    out.logprobs.extend(logprobs)
                out.token_ids.extend(new)
                if new:
                    live.last_token = new[-1]
                    live.generated += len(new)
                c.tokens_generated += len(new)
                if not result.is_final:
                    continue
                # An END_ID finish carries no end token: TensorRT-LLM does not return it, nor a
                # log probability for it, and the engine reports only what TensorRT-LLM
                # produced. The finish reason says eos; the router closes the stream on it.
                reason, error = self._finish_reason(result, live)
                out.finish_reason = reason
                out.error = error
                self.live.finish(rid, reason)
        # A request whose responses carried nothing new (possible with an empty final result
        # that was dropped above) must not appear as an empty, unfinished output.
        for rid, out in list(outs.items()):
            if not out.token_ids and out.finish_reason == _UNFINISHED:
                del outs[rid]
        if len(outs) != len(batch.outputs):
            kept = pb.IterationOutput()
            kept.outputs.extend(outs.values())
            return kept
        return batch

    def _cached_tokens(self, result, prompt_len: int) -> int:
        """Under the lock: the prompt tokens a request's KV took from the prefix cache, from its
        first result's RequestPerfMetrics.kv_cache_metrics.num_reused_blocks (request.cpp),
        counted when its context is allocated (LlmRequest::updateReusedBlocksPerRequest).
        TensorRT-LLM counts blocks, a partly reused one as whole, so this is reused blocks x
        tokens per block (as Dynamo's TensorRT-LLM worker computes OpenAI's cached_tokens), at
        most the prompt less its last token, which is always computed. 0 without metrics."""
        return cached_from_reused_blocks(
            getattr(result, "request_perf_metrics", None),
            self._kv[3] or self.config.tokens_per_block or 0,
            prompt_len,
        )

    def _add_prompt_logprobs(self, out: pb.RequestOutput, live: _Live, result) -> bool:
        """Under the lock, on the request's first result: its prompt's log probabilities from
        Result.context_logits ([prompt tokens, padded vocab], on the host: LlmRequest::createResult,
        batch_manager/llmRequest.cpp, sets it on every result of a request that asked). False
        when they are missing: the request is failed and TensorRT-LLM told to stop. The
        log-softmax runs on the GPU when there is one, over 256-row chunks (prompt_logprobs.py)."""
        from tensorgate.executor.engines.prompt_logprobs import from_logits

        assert live.prompt is not None
        try:
            prompt = from_logits(
                getattr(result, "context_logits", None),
                live.prompt,
                0,
                self.config.vocab_size,
                _logits_device(),
            )
        except (ValueError, RuntimeError) as e:
            out.finish_reason = pb.FINISH_REASON_ERROR
            out.error = f"TensorRT-LLM returned no usable prompt logits: {e}"
            self.live.finish(live.rid, pb.FINISH_REASON_ERROR)
            self._cancel_in_trtllm(live.tid)
            return False
        prompt.add_to(out, 0)
        live.prompt = None
        return True

    def _fail_short_logprobs(
        self, out: pb.RequestOutput, live: _Live, got: int, new: list[int]
    ) -> None:
        """Under the lock. The request asked for log probabilities and TensorRT-LLM returned
        fewer than tokens: the request fails rather than carry values the engine never produced.
        This response's tokens are dropped with them; TensorRT-LLM is told to stop."""
        out.finish_reason = pb.FINISH_REASON_ERROR
        out.error = (
            f"TensorRT-LLM returned {got} log probabilities for {len(new)} token(s) of a request "
            "that asked for them; the request is ended rather than report log probabilities "
            "the engine did not produce"
        )
        self.live.finish(live.rid, pb.FINISH_REASON_ERROR)
        self._cancel_in_trtllm(live.tid)

    def _cancel_in_trtllm(self, tid: int) -> None:
        try:
            self._executor.cancel_request(tid)  # executor.cpp
        except Exception as e:
            log.warning("cancel_request(%s) failed: %s", tid, e)

    def _finish_reason(self, result, live: _Live) -> tuple[int, str]:
        """Our finish reason, and the error message of an error finish."""
        t = self._t
        # Result.finish_reasons (one per beam) and FinishReason: request.cpp.
        reasons = getattr(result, "finish_reasons", None)
        reason = reasons[0] if reasons else None
        if reason == t.FinishReason.END_ID:
            return pb.FINISH_REASON_EOS_TOKEN, ""
        if reason == t.FinishReason.CANCELLED:
            return pb.FINISH_REASON_CANCELLED, ""
        if reason == t.FinishReason.LENGTH:
            return pb.FINISH_REASON_LENGTH, ""
        if reason == t.FinishReason.STOP_WORDS:
            # Our stop words are single tokens: the other eos ids and the stop ids.
            if live.last_token in live.stop:
                return pb.FINISH_REASON_STOP_TOKEN, ""
            return pb.FINISH_REASON_EOS_TOKEN, ""
        if reason == getattr(t.FinishReason, "TIMED_OUT", object()):
            # The contract has no timeout reason, and `length` would say the request got the
            # tokens it asked for: it did not, so it is an error.
            return (
                pb.FINISH_REASON_ERROR,
                f"TensorRT-LLM timed the request out (FinishReason.TIMED_OUT) after "
                f"{live.generated} of {live.max_new} tokens",
            )
        # Older bindings without finish_reasons (0.x before FinishReason existed): infer it.
        if live.last_token in live.stop:
            return pb.FINISH_REASON_STOP_TOKEN, ""
        if live.last_token in live.eos:
            return pb.FINISH_REASON_EOS_TOKEN, ""
        if live.generated < live.max_new and live.end_id >= 0:
            return pb.FINISH_REASON_EOS_TOKEN, ""  # ended early on the (unreturned) end id
        return pb.FINISH_REASON_LENGTH, ""

    def _fail_all(self, message: str) -> None:
        batch = pb.IterationOutput()
        with self._lock:
            self.live.fail_all(message, batch)
        if batch.outputs and self._emit is not None:
            self._emit(batch)

    # -- health, stats, shutdown ----------------------------------------------------------------

    def _unsupported(self, what: str) -> ControlUnsupported:
        # Rollout control: every control RPC answers UNIMPLEMENTED with this reason.
        return ControlUnsupported(
            f"the trtllm engine on an engine directory cannot {what}: a TensorRT engine's "
            "weights are compiled into it (trtllm-build) and its executor API has no sleep or "
            "weight-update call; serve the Hugging Face checkpoint instead (the LLM API "
            "flavour, with --rl-hooks)"
        )

    def health(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, self._fatal
        if self._shut:
            return False, "shutting down"
        if self._thread is not None and not self._thread.is_alive():
            return False, "the TensorRT-LLM response thread has stopped"
        return True, ""

    def _refresh_stats(self) -> None:
        """Drains the executor's iteration stats (get_latest_iteration_stats: executor.cpp;
        IterationStats, KvCacheStats: bindings.cpp) into a snapshot."""
        try:
            stats = list(self._executor.get_latest_iteration_stats())
        except Exception as e:
            log.debug("get_latest_iteration_stats failed: %s", e)
            return
        if not stats:
            return
        last = stats[-1]
        ifb = getattr(last, "inflight_batching_stats", None)
        with self._lock:
            # IterationStats.num_queued_requests: the executor's queue, requests not yet
            # scheduled once (executorImpl.cpp getCurrentIterationStats). Paused ones
            # (evicted under max_utilization, InflightBatchingStats.num_paused_requests) are
            # active requests waiting to resume: kept apart.
            self._queued = int(getattr(last, "num_queued_requests", 0) or 0)
            self._paused = int(getattr(ifb, "num_paused_requests", 0) or 0) if ifb else 0
            kv = getattr(last, "kv_cache_stats", None)
            if kv is not None:
                self._kv = (
                    int(kv.max_num_blocks),
                    int(kv.used_num_blocks),
                    int(kv.free_num_blocks),
                    int(kv.tokens_per_block),
                )
            latency = getattr(last, "iter_latency_ms", None)
            if latency:
                self._engine_latency = True
                self.counters.last_iteration_ms = float(latency)

    def stats(self) -> pb.StatsResponse:
        self._refresh_stats()
        with self._lock:
            live = len(self.live)
            queued = min(self._queued, live)
            _, used, free, per_block = self._kv
            return self.counters.to_proto(
                active=live - queued,
                queued=queued,
                blocks_used=used,
                blocks_free=free,
                block_size=per_block or (self.config.tokens_per_block or 0),
            )

    def scheduling(self) -> tuple[int, int, int]:
        """(running, paused, queued) requests as of the last iteration stats. Stats carries
        running + paused as active and queued apart; the contract has no paused field yet."""
        self._refresh_stats()
        with self._lock:
            live = len(self.live)
            queued = min(self._queued, live)
            paused = min(self._paused, live - queued)
            return live - queued - paused, paused, queued

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._fail_all("the executor is shutting down")
        try:
            self._executor.shutdown()  # executor.cpp
        except Exception as e:
            log.warning("TensorRT-LLM executor shutdown failed: %s", e)


def _logits_device() -> str | None:
    """Where prompt logits are turned into log probabilities: the GPU when torch sees one."""
    import torch  # in every TensorRT-LLM environment

    return "cuda" if torch.cuda.is_available() else None


def _new_logprobs(result, seen: int, n: int) -> list[float]:
    """The log probabilities of a streamed result's n new tokens, the request having had
    `seen` tokens before; fewer when the result carries fewer. Result.log_probs (per beam) is
    cumulative in a streamed result: every token's so far, while output_token_ids holds only
    the new ones (tensorrt_llm/executor/result.py `_handle_sequence` assigns
    `output.logprobs = log_probs[beam]` and asserts its length equals all tokens so far)."""
    lps = getattr(result, "log_probs", None)
    if not lps:
        return []
    return list(lps[0])[seen : seen + n]


# Settings the trtllm engine reads only on a checkpoint (trtllm_llmapi.py), and only on an
# engine directory (here).
CHECKPOINT_ONLY = (
    "max_num_tokens",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "kv_event_buffer_size",
    "guided_decoding_backend",
    "rl_hooks",
)
ENGINE_DIR_ONLY = ("capacity_scheduler_policy",)


def ignored_settings(settings: ExecutorSettings, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` set away from their default."""
    defaults = ExecutorSettings()
    return [
        "--" + n.replace("_", "-") for n in names if getattr(settings, n) != getattr(defaults, n)
    ]


def claimed_features(**claimed: bool) -> EngineFeatures:
    """EngineFeatures with the claims this contract version has fields for (min_new_tokens,
    logit_bias and ignore_eos arrive with the structured-output contract)."""
    names = {f.name for f in dataclasses.fields(EngineFeatures)}
    return EngineFeatures(**{k: v for k, v in claimed.items() if k in names})


def cached_from_reused_blocks(metrics, tokens_per_block: int, prompt_len: int) -> int:
    """Prompt tokens taken from the prefix cache, from a RequestPerfMetrics (None: unknown, 0)."""
    kv = getattr(metrics, "kv_cache_metrics", None)
    reused = int(getattr(kv, "num_reused_blocks", 0) or 0) if kv is not None else 0
    return max(min(reused * tokens_per_block, prompt_len - 1), 0)


def trtllm_priority(priority: int) -> float:
    """The contract's priority (an int, higher first, 0 by default) as TensorRT-LLM's (a
    float in [0, 1], 0.5 by default): 0 -> 0.5, each step 0.01, clamped at the ends."""
    return min(1.0, max(0.0, 0.5 + priority / 100.0))
