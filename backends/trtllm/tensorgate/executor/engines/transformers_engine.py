"""The transformers engine, on transformers' own continuous batching
(`model.init_continuous_batching`): paged KV cache, streaming, cancellation. Runs on CPU
(the embedded default) and on CUDA.

One consumer thread takes the manager's streamed results, coalesces everything available into
one batch per engine step and hands it to the server: O(steps) messages, no per-token text.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import RequestStatus

from tensorgate.executor.engine import (
    Emit,
    Engine,
    EngineError,
    EngineInfo,
    EngineLimits,
    check_request,
    finished,
)
from tensorgate.executor.engines.seeded_sampling import build_processor_list, request_kwargs
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.transformers")

PAGE_SIZE = 64


@dataclass
class _Live:
    sent: int
    eos: frozenset[int]
    stop: frozenset[int]
    max_new: int


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"--device {device} was asked for but torch sees no CUDA device")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are slow on most CPUs; fp32 is the safe CPU default.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise EngineError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def _eos_ids(model_dir: Path, config) -> list[int]:
    ids: list[int] = []
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
        raw = gen.eos_token_id
    except OSError:
        raw = None
    if raw is None:
        raw = getattr(config, "eos_token_id", None)
    if isinstance(raw, int):
        ids = [raw]
    elif raw:
        ids = [int(i) for i in raw]
    return [i for i in ids if i >= 0]


class TransformersEngine(Engine):
    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int | None = None,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        kv_cache_tokens: int | None = None,
    ) -> None:
        super().__init__()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        config = AutoConfig.from_pretrained(model_dir)
        log.info("loading %s on %s as %s", model_dir, self.device, self.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, device_map=str(self.device)
        ).eval()
        self.model_id = str(model_dir)
        self.vocab_size = int(config.vocab_size)
        self.eos_ids = _eos_ids(model_dir, config)

        max_pos = int(getattr(config, "max_position_embeddings", 4096) or 4096)
        total = min(max_total_tokens or min(max_pos, 4096), max_pos)
        batch = max_batch_size or (16 if self.device.type == "cpu" else 64)
        # Default cache: every slot of the batch can hold a quarter of the context on CPU
        # (memory there is shared with everything else), the full context on GPU.
        default_kv = batch * total // (4 if self.device.type == "cpu" else 1)
        kv_tokens = max(kv_cache_tokens or default_kv, total)
        self.num_blocks = -(-kv_tokens // PAGE_SIZE)
        max_batch_tokens = min(max(total, 512), 2048 if self.device.type == "cpu" else 8192)
        self.limits = EngineLimits(
            max_batch_size=batch,
            max_input_tokens=min(max_input_tokens or total - 1, total - 1),
            max_total_tokens=total,
            max_num_tokens=max_batch_tokens,
        )
        gen_config = GenerationConfig(
            do_sample=False,  # sampling is per request, see seeded_sampling
            max_new_tokens=total,
            eos_token_id=self.eos_ids or -1,
            pad_token_id=self.eos_ids[0] if self.eos_ids else 0,
        )
        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=self.num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=batch,
            per_request_processors=True,
            use_cuda_graph=False,
            seed=0,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        self.manager.logit_processor = build_processor_list(self.vocab_size)
        self._live: dict[int, _Live] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._emit: Emit | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TransformersEngine:
        if args.model_id is None:
            raise EngineError("the transformers engine needs --model-id")
        return cls(
            model_dir=args.model_id,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
            kv_cache_tokens=getattr(args, "kv_cache_tokens", None),
        )

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id=self.model_id,
            engine="transformers",
            dtype=str(self.dtype).removeprefix("torch."),
            device=self.device.type,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_ids,
            limits=self.limits,
            kv_capacity_tokens=self.num_blocks * PAGE_SIZE,
            features={"seed": True, "top_k": True, "top_p": True, "stop_token_ids": True},
        )

    def start(self, emit: Emit) -> None:
        self._emit = emit
        self.manager.start()
        self._thread = threading.Thread(target=self._consume, name="cb-consumer", daemon=True)
        self._thread.start()

    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        errors: list[pb.RequestOutput] = []
        for r in requests:
            self.counters.requests_received += 1
            err = check_request(r, self.limits)
            if err is None:
                stop = frozenset(r.stop_token_ids)
                eos = frozenset() if r.ignore_eos else frozenset(self.eos_ids)
                with self._lock:
                    self._live[r.id] = _Live(0, eos, stop, r.max_new_tokens)
                ends = sorted(eos | stop) or [-1]
                added = self.manager.add_request(
                    list(r.input_ids),
                    request_id=str(r.id),
                    max_new_tokens=r.max_new_tokens,
                    streaming=True,
                    eos_token_id=ends,
                    **request_kwargs(r.sampling, self.vocab_size),
                )
                if added is None:
                    with self._lock:
                        self._live.pop(r.id, None)
                    err = "the engine is not accepting requests (stopping or failed)"
            if err is not None:
                self.counters.requests_failed += 1
                errors.append(finished(r.id, pb.FINISH_REASON_ERROR, err))
        if errors and self._emit is not None:
            self._emit(errors)

    def cancel(self, request_ids: list[int]) -> None:
        outs = []
        for rid in request_ids:
            with self._lock:
                live = self._live.pop(rid, None)
            if live is None:
                continue
            self.manager.cancel_request(str(rid))
            self.counters.requests_cancelled += 1
            outs.append(finished(rid, pb.FINISH_REASON_CANCELLED))
        if outs and self._emit is not None:
            self._emit(outs)

    def _consume(self) -> None:
        out_queue = self.manager.output_router.output_queue
        emit = self._emit
        assert emit is not None
        c = self.counters
        while not self._stop.is_set():
            first = self.manager.get_result(timeout=0.1)
            if first is None:
                fatal = self.manager.background_thread_status.fatal_error
                if fatal is not None:
                    self._fail_all(f"the engine failed: {fatal}")
                    return
                continue
            started = time.monotonic()
            results = [first]
            while True:
                try:
                    results.append(out_queue.get_nowait())
                except queue.Empty:
                    break
            outputs = []
            for res in results:
                output = self._to_output(res)
                if output is not None:
                    outputs.append(output)
            if outputs:
                emit(outputs)
            c.iterations += 1
            c.last_iteration_ms = (time.monotonic() - started) * 1000

    def _to_output(self, res) -> pb.RequestOutput | None:
        rid = int(res.request_id)
        with self._lock:
            live = self._live.get(rid)
            if live is None:
                return None  # cancelled: its CANCELLED output was already sent
            tokens = res.generated_tokens
            new = tokens[live.sent :]
            live.sent = len(tokens)
            reason = pb.FINISH_REASON_UNSPECIFIED
            error = ""
            if res.status == RequestStatus.FAILED:
                reason, error = pb.FINISH_REASON_ERROR, res.error or "generation failed"
            elif res.status == RequestStatus.FINISHED:
                last = tokens[-1] if tokens else -1
                if last in live.stop:
                    reason = pb.FINISH_REASON_STOP_TOKEN
                elif last in live.eos:
                    reason = pb.FINISH_REASON_EOS_TOKEN
                else:
                    reason = pb.FINISH_REASON_LENGTH
            if reason != pb.FINISH_REASON_UNSPECIFIED:
                del self._live[rid]
        c = self.counters
        c.tokens_generated += len(new)
        if reason == pb.FINISH_REASON_ERROR:
            c.requests_failed += 1
        elif reason != pb.FINISH_REASON_UNSPECIFIED:
            c.requests_finished += 1
        if not new and reason == pb.FINISH_REASON_UNSPECIFIED:
            return None
        return pb.RequestOutput(request_id=rid, token_ids=new, finish_reason=reason, error=error)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._live)
            self._live.clear()
        self.counters.requests_failed += len(ids)
        if ids and self._emit is not None:
            self._emit([finished(i, pb.FINISH_REASON_ERROR, message) for i in ids])

    def health(self) -> tuple[bool, str]:
        fatal = self.manager.background_thread_status.fatal_error
        if fatal is not None:
            return False, f"engine failed: {fatal}"
        if not self.manager.is_running():
            return False, "continuous batching loop is not running"
        return True, ""

    def stats(self) -> pb.StatsResponse:
        c = self.counters
        with self._lock:
            live = len(self._live)
        scheduler = getattr(getattr(self.manager, "batch_processor", None), "scheduler", None)
        queued = len(getattr(scheduler, "waiting_requests", {}) or {}) if scheduler else 0
        cache = getattr(getattr(self.manager, "batch_processor", None), "cache", None)
        free = self.num_blocks
        if cache is not None:
            try:
                free = round(cache.compute_free_capacity(relative=True) * self.num_blocks)
            except Exception:
                free = self.num_blocks
        return pb.StatsResponse(
            active_requests=max(live - queued, 0),
            queued_requests=queued,
            kv_blocks_used=max(self.num_blocks - free, 0),
            kv_blocks_free=free,
            kv_block_size=PAGE_SIZE,
            last_iteration_ms=c.last_iteration_ms,
            iterations=c.iterations,
            requests_received=c.requests_received,
            requests_finished=c.requests_finished,
            requests_cancelled=c.requests_cancelled,
            requests_failed=c.requests_failed,
            tokens_generated=c.tokens_generated,
        )

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._fail_all("the executor is shutting down")
        self.manager.stop(block=True, timeout=10, hard_stop=True)
