"""The transformers engine, on transformers' own continuous batching
(`model.init_continuous_batching`): paged KV cache, streaming, cancellation, prefix sharing.
Runs on CPU (the embedded default) and on CUDA.

The manager's output router is replaced by one that turns each step's results into one wire
message in the manager's own thread and hands it to the server: one cross-thread hand-off per
step (as `transformers serve` gets with its result handlers), not one queue put, wake-up and GIL
hand-over per token. No per-token text.
Per-request sampling and logprobs, penalties, logit bias, min_new_tokens and grammars are done
by our own CB logits processor (see cb_sampling); grammars with llguidance (guided_decoding).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from tensorgate.executor.control import KV_CACHE, ControlFeatures, ControlResult
from tensorgate.executor.engine import (
    Emit,
    Engine,
    EngineError,
    EngineFeatures,
    EngineInfo,
    EngineLimits,
    add_finished,
    check_features,
    check_request,
)
from tensorgate.executor.engines.cb_sampling import (
    LogprobBook,
    RowState,
    build_processor_list,
    needs_state,
    row_spec,
)
from tensorgate.executor.engines.guided_decoding import GrammarBackend, GrammarError
from tensorgate.executor.engines.prompt_logprobs import PromptLogprobs, PromptScorer
from tensorgate.executor.engines.transformers_control import RolloutControl
from tensorgate.executor.engines.transformers_kv_events import (
    LedgerEvents,
    transformers_hashes_match,
)
from tensorgate.executor.engines.transformers_prefix_hits import PrefixHits
from tensorgate.executor.kv_events import KvEventLog
from tensorgate.executor.live_requests import LiveRequests
from tensorgate.executor.settings import DEFAULT_BLOCK_SIZE, EngineConfig
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.transformers")

MAX_TOP_N_TOKENS = 5
CACHE_SETUP_TIMEOUT_S = 600.0

_UNFINISHED = pb.FINISH_REASON_UNSPECIFIED


@dataclass
class _Live:
    """Engine-side state of one request; the manager keeps its own."""

    sent: int  # generated tokens already emitted
    eos: frozenset[int]
    stop: frozenset[int]
    logprobs: bool
    top_n: int
    row: RowState | None = None  # what the processor records for it, when anything
    prompt: bool = False  # its first output carries the prompt's log probabilities


class _StepRouter(OutputRouter):
    """Receives every output of the manager, in the manager's thread: one call per step
    (`deliver_batch`), or one output when a request fails outside a step (`deliver`)."""

    def __init__(self, on_outputs) -> None:
        super().__init__()
        self._on_outputs = on_outputs

    def deliver(self, output: GenerationOutput) -> None:
        self._on_outputs([output], step=False)

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        self._on_outputs(outputs, step=True)


@dataclass(frozen=True)
class TransformersSettings:
    """Engine settings; None means derived from the model and the device."""

    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_num_tokens: int | None = None
    kv_cache_blocks: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    # Prefix sharing (transformers' allow_block_sharing) and the KV-cache events it makes.
    prefix_sharing: bool = True


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EngineError(f"--device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"--device {device} was asked for but torch sees no CUDA device")
    return resolved


def _configure_attention(device: torch.device) -> None:
    """On CUDA, keep SDPA off cuDNN's attention kernel.

    Continuous batching calls SDPA with a mask whose key length changes at every step (it is
    the batch's total KV length). With a mask, torch (2.11, H100) picks cuDNN attention, which
    builds an execution plan for each new shape: ~75 ms of CPU per new length, against 0.2 ms
    for the memory-efficient kernel, which needs no plan. Real traffic rarely repeats a length,
    so cuDNN would add most of a plan build to every step (benchmarks/sdpa_shapes.py; docs/
    benchmarks.md, 2d). Process-wide, and the executor is its own process."""
    if device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("SDPA: cuDNN attention off (it builds a plan per new key length)")


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are slow on most CPUs; fp32 is the safe CPU default.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise EngineError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return dtypes[dtype]


def _eos_ids(model_dir: Path, config) -> list[int]:
    try:
        raw = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        raw = None
    if raw is None:
        raw = getattr(config, "eos_token_id", None)
    if raw is None:
        return []
    ids = [raw] if isinstance(raw, int) else [int(i) for i in raw]
    return [i for i in ids if i >= 0]


def _derive_limits(
    s: TransformersSettings, max_positions: int, device: torch.device
) -> tuple[EngineLimits, int]:
    """Limits from the model's context and the CLI overrides, and the KV cache size in tokens
    to ask for."""
    cpu = device.type == "cpu"
    total = min(s.max_total_tokens or min(max_positions, 4096), max_positions)
    if total < 2:
        raise EngineError(f"max_total_tokens is {total}: it must be at least 2")
    batch = s.max_batch_size or (16 if cpu else 64)
    max_input = min(s.max_input_tokens or total - 1, total - 1)
    # Prefill chunk budget per step; longer prompts are prefilled in chunks.
    num_tokens = s.max_num_tokens or min(max(total, 512), 2048 if cpu else 8192)
    if s.kv_cache_blocks:
        kv_tokens = s.kv_cache_blocks * s.block_size
    else:
        # Every batch slot can hold a quarter of the context (memory on CPU is shared with
        # everything else); always room for one full-length request.
        kv_tokens = max(batch * total // 4, total)
    if kv_tokens < total:
        raise EngineError(
            f"the KV cache holds {kv_tokens} tokens, less than one request of max_total_tokens "
            f"{total}: raise --kv-cache-blocks or lower --max-total-tokens"
        )
    limits = EngineLimits(
        max_batch_size=batch,
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_num_tokens=num_tokens,
        max_top_n_tokens=MAX_TOP_N_TOKENS,
    )
    return limits, kv_tokens


class TransformersEngine(Engine):
    def __init__(self, model_dir: Path, settings: TransformersSettings | None = None) -> None:
        super().__init__()
        s = settings or TransformersSettings()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
        if s.block_size < 4:
            raise EngineError(f"--block-size {s.block_size}: it must be at least 4")
        self.device = _resolve_device(s.device)
        self.dtype = _resolve_dtype(s.dtype, self.device)
        _configure_attention(self.device)
        config = AutoConfig.from_pretrained(model_dir)
        self.model_id = str(model_dir)
        self.vocab_size = int(config.vocab_size)
        self.eos_ids = _eos_ids(model_dir, config)
        max_positions = int(getattr(config, "max_position_embeddings", 0) or 4096)
        self.limits, kv_tokens = _derive_limits(s, max_positions, self.device)
        self.block_size = s.block_size

        log.info("loading %s on %s as %s", model_dir, self.device, self.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, device_map=str(self.device)
        ).eval()
        gen_config = GenerationConfig(
            do_sample=False,  # argmax mode: sampling is per request, in cb_sampling
            max_new_tokens=self.limits.max_total_tokens,
            eos_token_id=self.eos_ids or -1,
            pad_token_id=self.eos_ids[0] if self.eos_ids else 0,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=s.block_size,
            num_blocks=-(-kv_tokens // s.block_size),
            max_batch_tokens=self.limits.max_num_tokens,
            max_requests_per_batch=self.limits.max_batch_size,
            # Our processor runs Python per step and keys rows by (request, step) when the batch
            # is prepared: that needs eager, synchronous steps.
            use_cuda_graph=False,
            use_async_batching=False,
            seed=0,
            allow_block_sharing=s.prefix_sharing,
        )
        # KV-cache events of the blocks the cache shares (transformers_kv_events), when it
        # shares any and hashes them as the contract does.
        self.kv_ledger: LedgerEvents | None = None
        if s.prefix_sharing:
            mismatch = transformers_hashes_match()
            if mismatch is None:
                self.kv_ledger = LedgerEvents(s.block_size, KvEventLog())
            else:
                log.warning("KV-cache events off: %s", mismatch)
        self.book = LogprobBook()
        # ~1 s for a 50k vocabulary; None (guided decoding off) when the checkpoint has no
        # tokenizer llguidance can read.
        self.grammar = GrammarBackend.load(model_dir, self.vocab_size, self.eos_ids)
        self.features = EngineFeatures(
            logprobs=True,
            top_n_tokens=True,
            seed=True,
            top_k=True,
            top_p=True,
            typical_p=True,
            repetition_penalty=True,
            frequency_penalty=True,
            presence_penalty=True,
            stop_token_ids=True,
            guided_decoding=self.grammar is not None,
            min_new_tokens=True,
            logit_bias=True,
            # Each request carries its own eos set into the manager (empty when ignored).
            ignore_eos=True,
            prompt_logprobs=True,  # one forward pass of the prompt: see PromptScorer
        )
        self.prompts = PromptScorer(self.model)
        self.manager = self.model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        self._lock = threading.Lock()  # guards the live table and the counters
        # Held while a request is handed to the manager: a memory release takes it to close
        # admission, so no request slips into a manager that is being emptied.
        self.admission = threading.Lock()
        self.rollout = RolloutControl(self)
        self.live: LiveRequests[_Live] = LiveRequests(self.counters)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._emit: Emit | None = None
        self._last_step: float | None = None  # when the last step's outputs came, if busy since
        # Both replaced before the loop starts: the batch processor picks them up when it is
        # created.
        self.manager.logit_processor = build_processor_list(self.book, self.grammar, self.prompts)
        self.manager.output_router = _StepRouter(self._on_outputs)
        # Prompt tokens each request takes from the prefix cache, for its first output.
        self.prefix_hits = PrefixHits()
        self._start_manager()
        cache = self.manager.batch_processor.cache
        # The cache rounds up to whole sectors: report what was really allocated.
        self.num_blocks = int(cache.num_blocks)
        if self.kv_ledger is not None and self.kv_ledger.ledger_hashes(cache) is None:
            # transformers shares prefixes only when every layer attends fully.
            log.info("KV-cache events off: this model's paged cache shares no prefix")
            self.kv_ledger = None

    def _start_manager(self) -> None:
        """Starts the CB loop now, so a cache that cannot be allocated fails the load (a clear
        error and a non-zero exit) rather than the first request."""
        self.manager.start()
        deadline = time.monotonic() + CACHE_SETUP_TIMEOUT_S
        while self.manager.batch_processor is None:
            fatal = self.manager.background_thread_status.fatal_error
            if fatal is not None or not self.manager.is_running():
                raise EngineError(f"cannot set up continuous batching: {fatal or 'loop exited'}")
            if time.monotonic() > deadline:
                # Its thread is not a daemon: stop it, or it keeps the process alive.
                self.manager.stop(block=False, hard_stop=True)
                raise EngineError("continuous batching did not set up its KV cache in time")
            time.sleep(0.01)
        # Each start makes a new cache (a memory resume too); no request runs yet (none was
        # accepted before the first start, and admission is closed while memory is released).
        self.prefix_hits.install(self.manager.batch_processor.cache)

    @classmethod
    def from_config(cls, config: EngineConfig) -> TransformersEngine:
        if config.model_dir is None:
            raise EngineError("the transformers engine needs --model-id")
        s = config.settings
        return cls(
            config.model_dir,
            TransformersSettings(
                device=s.device,
                dtype=s.dtype,
                max_batch_size=s.max_batch_size,
                max_input_tokens=s.max_input_tokens,
                max_total_tokens=s.max_total_tokens,
                max_num_tokens=s.max_num_tokens,
                kv_cache_blocks=s.kv_cache_blocks,
                block_size=s.block_size,
                prefix_sharing=s.enable_kv_block_reuse,
            ),
        )

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id=self.model_id,
            engine="transformers",
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_ids,
            limits=self.limits,
            kv_capacity_tokens=self.num_blocks * self.block_size,
            features=self.features,
        )

    def start(self, emit: Emit) -> None:
        self._emit = emit
        self._thread = threading.Thread(target=self._watch, name="cb-watchdog", daemon=True)
        self._thread.start()

    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        errors = pb.IterationOutput()
        for r in requests:
            err = check_request(r, self.limits) or check_features(r, self.features)
            if err is None:
                with self.admission:
                    err = self.rollout.refusal() or self._add(r)
            with self._lock:
                self.counters.requests_received += 1
                if err is not None:
                    self.counters.requests_failed += 1
            if err is not None:
                add_finished(errors, r.id, pb.FINISH_REASON_ERROR, err)
        if errors.outputs and self._emit is not None:
            self._emit(errors)

    def _add(self, r: pb.GenerateRequest) -> str | None:
        stop = frozenset(r.stop_token_ids)
        eos = frozenset() if r.ignore_eos else frozenset(self.eos_ids)
        key = str(r.id)
        spec = row_spec(r, eos | stop)
        wants_logprobs = spec is not None and (spec.logprobs or spec.top_n > 0)
        grammar = r.HasField("grammar")
        row = None
        if needs_state(spec, grammar):
            try:
                # Built here, once: a grammar that cannot be enforced fails its own request.
                matcher = self.grammar.matcher(r.grammar) if grammar and self.grammar else None
            except GrammarError as e:
                return str(e)
            row = RowState(list(r.input_ids), matcher, r.resumed_tokens)
        kwargs = {}
        if spec is not None:
            kwargs["row_spec"] = spec
        if row is not None:
            kwargs["row_state"] = row
        with self._lock:
            if r.id in self.live:
                return f"request id {r.id} is already in flight"
            live = _Live(0, eos, stop, r.return_logprobs, r.top_n_tokens, row)
            live.prompt = r.return_prompt_logprobs
            self.live.add(r.id, live)
        if wants_logprobs:
            self.book.track(key)
        if live.prompt:
            self.prompts.register(key, list(r.input_ids), r.top_n_tokens)
        added = self.manager.add_request(
            list(r.input_ids),
            request_id=key,
            max_new_tokens=r.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(eos | stop) or -1,
            **kwargs,
        )
        if added is None:
            with self._lock:
                # Never started: not counted as ended (submit counts it as failed).
                self.live.forget(r.id)
            self.book.forget(key)
            self.prompts.forget(key)
            return "the engine is not accepting requests (it is stopping or has failed)"
        return None

    def cancel(self, request_ids: list[int]) -> None:
        batch = pb.IterationOutput()
        with self._lock:
            cancelled = self.live.cancel(request_ids, batch)
        # Outside the lock: the manager's thread takes it to deliver outputs.
        for rid, _ in cancelled:
            self.manager.cancel_request(str(rid))
            self.book.forget(str(rid))
            self.prompts.forget(str(rid))
            self.prefix_hits.forget(str(rid))
        if batch.outputs and self._emit is not None:
            self._emit(batch)

    def _watch(self) -> None:
        """Fails every live request if the manager's loop dies: it delivers nothing then."""
        while not self._stop.wait(0.1):
            fatal = self.manager.background_thread_status.fatal_error
            if fatal is not None:
                self._fail_all(f"the engine failed: {fatal}")
                return

    def _on_outputs(self, results: list[GenerationOutput], step: bool) -> None:
        """Results in the manager's thread, one message to the server: a step's (`step`), or
        a request failed outside a step, which is not counted as an iteration."""
        now = time.monotonic()
        batch = pb.IterationOutput()
        for res in results:
            self._add_output(batch, res)
        if batch.outputs and self._emit is not None:
            self._emit(batch)
        if not step:
            return
        if self.kv_ledger is not None:
            # This thread is the manager's, the only one that changes the cache's ledger.
            bp = self.manager.batch_processor
            self.kv_ledger.after_step(bp.cache if bp is not None else None, results)
        with self._lock:
            self.counters.iterations += 1
            if self._last_step is not None:
                # From one step's outputs to the next's: a step, when requests were running
                # all along (the first step after an idle spell is not counted).
                self.counters.last_iteration_ms = (now - self._last_step) * 1000
            self._last_step = now if self.live else None

    def _add_output(self, batch: pb.IterationOutput, res) -> None:
        rid = int(res.request_id)
        key = str(rid)
        tokens = res.generated_tokens
        with self._lock:
            live = self.live.get(rid)
            if live is None:
                return  # cancelled: its CANCELLED output was already sent
            first = live.sent
            new = tokens[first:]
            live.sent = len(tokens)
            reason, error = _finish_reason(res, tokens, live)
            running = reason == _UNFINISHED
            if live.row is not None and reason != pb.FINISH_REASON_ERROR:
                # The processor's record of the chosen tokens must be what the manager
                # produced: penalties and grammar state are built on it.
                if live.row.error is not None:
                    reason, error, new = pb.FINISH_REASON_ERROR, live.row.error, []
                elif live.row.generated[first : len(tokens)] != new:
                    reason, new = pb.FINISH_REASON_ERROR, []
                    error = (
                        "the sampler's record of the chosen tokens disagrees with the engine's; "
                        "the request is ended rather than continue with penalties or a grammar "
                        "applied to the wrong tokens"
                    )
            prompt = None
            if live.prompt and first == 0 and reason != pb.FINISH_REASON_ERROR:
                if new or reason != _UNFINISHED:
                    # The first output carries them (computed when this step was prepared).
                    taken = self.prompts.take(key)
                    if isinstance(taken, PromptLogprobs):
                        prompt = taken
                    else:
                        reason, new = pb.FINISH_REASON_ERROR, []
                        error = taken or (
                            "the engine computed no log probabilities for the prompt of a "
                            "request that asked for them; the request is ended rather than "
                            "answer without them"
                        )
            lps = None
            if new and (live.logprobs or live.top_n):
                lps = self.book.take(key, first, len(new))
                missing = sum(lp is None for lp in lps)
                if missing:
                    # cb_sampling records every row that asks, so this is a bug; the request
                    # fails rather than carry log probabilities the engine did not produce.
                    reason = pb.FINISH_REASON_ERROR
                    error = (
                        f"the engine recorded no log probability for {missing} of {len(new)} "
                        "token(s) of a request that asked for them; the request is ended "
                        "rather than report values the engine did not produce"
                    )
                    new, lps = [], None
            self.counters.tokens_generated += len(new)
            if reason != _UNFINISHED:
                self.live.finish(rid, reason)
        if reason == pb.FINISH_REASON_ERROR and running:
            self.manager.cancel_request(key)  # a queue put: fine from the manager's thread
        if not new and reason == _UNFINISHED:
            return
        out = batch.outputs.add(request_id=rid, token_ids=new, finish_reason=reason, error=error)
        if first == 0:
            out.cached_tokens = self.prefix_hits.take(key)
        if reason != _UNFINISHED:
            self.prefix_hits.forget(key)  # matched again after a preemption: not reported
        if prompt is not None and reason != pb.FINISH_REASON_ERROR:
            prompt.add_to(out, live.top_n)
        for lp in lps or ():
            if live.logprobs:
                out.logprobs.append(lp.logprob)
            if live.top_n:
                out.top_tokens.add(ids=lp.top_ids, logprobs=lp.top_logprobs)
        if reason != _UNFINISHED and (live.logprobs or live.top_n):
            self.book.forget(key)
        if reason != _UNFINISHED and live.prompt:
            self.prompts.forget(key)

    def _fail_all(self, message: str) -> None:
        batch = pb.IterationOutput()
        with self._lock:
            failed = self.live.fail_all(message, batch)
        for rid, _ in failed:
            self.book.forget(str(rid))
            self.prompts.forget(str(rid))
            self.prefix_hits.forget(str(rid))
        if batch.outputs and self._emit is not None:
            self._emit(batch)

    def health(self) -> tuple[bool, str]:
        if KV_CACHE in self.rollout.released:
            # Stopped on request, not failed: Info says which tags are released.
            return True, ""
        fatal = self.manager.background_thread_status.fatal_error
        if fatal is not None:
            return False, f"engine failed: {fatal}"
        if not self.manager.is_running():
            return False, "the continuous batching loop is not running"
        return True, ""

    def stats(self) -> pb.StatsResponse:
        processor = self.manager.batch_processor
        queued = self.manager.input_queue.qsize()
        free = self.num_blocks
        if processor is not None:
            # Read without the CB thread's cooperation: len() and a free-list count are
            # consistent enough for a gauge.
            queued += len(processor.scheduler.waiting_requests)
            free = min(round(processor.cache.compute_free_capacity(relative=True) * free), free)
        with self._lock:
            live = len(self.live)
            return self.counters.to_proto(
                active=max(live - queued, 0),
                queued=min(queued, live),
                blocks_used=self.num_blocks - free,
                blocks_free=free,
                block_size=self.block_size,
            )

    def kv_cache_event_batch(self) -> pb.KvCacheEventBatch | None:
        if self.kv_ledger is None:
            return None
        return self.kv_ledger.events.drain()

    # -- rollout control (transformers_control.py) -----------------------------------------------

    def control_features(self) -> ControlFeatures:
        return self.rollout.features()

    def released_memory_tags(self) -> list[str]:
        return self.rollout.released_tags()

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

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.rollout.close()
        self._fail_all("the executor is shutting down")
        self.manager.stop(block=True, timeout=10, hard_stop=True)


def _finish_reason(res, tokens: list[int], live: _Live) -> tuple[int, str]:
    if res.status == RequestStatus.FAILED:
        return pb.FINISH_REASON_ERROR, res.error or "generation failed"
    if res.status != RequestStatus.FINISHED:
        return _UNFINISHED, ""
    last = tokens[-1] if tokens else -1
    if last in live.stop:
        return pb.FINISH_REASON_STOP_TOKEN, ""
    if last in live.eos:
        return pb.FINISH_REASON_EOS_TOKEN, ""
    if live.row is not None and live.row.done:
        # The grammar is complete: its last token ends the request, as a stop token would.
        return pb.FINISH_REASON_STOP_TOKEN, ""
    return pb.FINISH_REASON_LENGTH, ""
