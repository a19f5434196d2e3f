"""A model-free engine with a fixed cadence: one token per active request per iteration.

It exists to measure the stack alone, at the token rates TensorRT-LLM reaches. Token ids are
deterministic (a function of request id and step) and never an eos id.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

from tensorgate.executor.engine import (
    Emit,
    Engine,
    EngineInfo,
    EngineLimits,
    Inbox,
    check_request,
    finished,
)
from tensorgate.v1 import executor_pb2 as pb

BLOCK_SIZE = 64


class _Active:
    __slots__ = ("generated", "max_new", "prompt_len", "rid")

    def __init__(self, rid: int, prompt_len: int, max_new: int) -> None:
        self.rid = rid
        self.prompt_len = prompt_len
        self.max_new = max_new
        self.generated = 0


class SyntheticEngine(Engine):
    def __init__(
        self,
        iteration_ms: float = 20.0,
        max_batch_size: int = 256,
        max_input_tokens: int = 4096,
        max_total_tokens: int = 8192,
        vocab_size: int = 32000,
    ) -> None:
        super().__init__()
        self.period = iteration_ms / 1000.0
        self.vocab_size = vocab_size
        self.limits = EngineLimits(
            max_batch_size=max_batch_size,
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_num_tokens=max_batch_size * max_total_tokens,
        )
        self.inbox = Inbox()
        self.waiting: collections.deque[pb.GenerateRequest] = collections.deque()
        self.active: dict[int, _Active] = {}
        self._snapshot = (0, 0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Ordinary ids only: low ids are special tokens in most vocabularies.
        self._low = min(1000, vocab_size // 4)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SyntheticEngine:
        return cls(
            iteration_ms=args.iteration_ms if args.iteration_ms is not None else 20.0,
            max_batch_size=args.max_batch_size or 256,
            max_input_tokens=args.max_input_tokens or 4096,
            max_total_tokens=args.max_total_tokens or 8192,
            vocab_size=args.vocab_size or 32000,
        )

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id="synthetic",
            engine="synthetic",
            dtype="none",
            device="cpu",
            vocab_size=self.vocab_size,
            eos_token_ids=[],
            limits=self.limits,
            kv_capacity_tokens=self.limits.max_batch_size * self.limits.max_total_tokens,
            # It ignores sampling, so it claims none of it: the router refuses such requests.
            features={},
        )

    def start(self, emit: Emit) -> None:
        self._thread = threading.Thread(target=self._loop, args=(emit,), name="synthetic")
        self._thread.start()

    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        self.inbox.put_requests(requests)

    def cancel(self, request_ids: list[int]) -> None:
        self.inbox.put_cancels(request_ids)

    def token(self, rid: int, step: int) -> int:
        return self._low + (rid * 7919 + step * 104729) % (self.vocab_size - self._low)

    def _loop(self, emit: Emit) -> None:
        c = self.counters
        next_tick = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            out: list[pb.RequestOutput] = []
            self._take_inbox(out)
            while self.waiting and len(self.active) < self.limits.max_batch_size:
                r = self.waiting.popleft()
                self.active[r.id] = _Active(r.id, len(r.input_ids), r.max_new_tokens)
            done = []
            for a in self.active.values():
                tok = self.token(a.rid, a.generated)
                a.generated += 1
                if a.generated >= a.max_new:
                    out.append(
                        pb.RequestOutput(
                            request_id=a.rid,
                            token_ids=[tok],
                            finish_reason=pb.FINISH_REASON_LENGTH,
                        )
                    )
                    done.append(a.rid)
                else:
                    out.append(pb.RequestOutput(request_id=a.rid, token_ids=[tok]))
            for rid in done:
                del self.active[rid]
            # Stats read this from another thread: publish a snapshot, never the live dict.
            self._snapshot = (
                len(self.active),
                len(self.waiting),
                sum(a.prompt_len + a.generated for a in self.active.values()),
            )
            c.requests_finished += len(done)
            c.tokens_generated += len(self.active) + len(done)
            if out:
                emit(out)
            c.iterations += 1
            c.last_iteration_ms = (time.monotonic() - started) * 1000
            if not self.active and not self.waiting:
                # Idle: sleep until work arrives rather than spinning at the cadence.
                self.inbox.wake.wait(timeout=0.5)
                next_tick = time.monotonic()
                continue
            next_tick += self.period
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_tick = time.monotonic()
        self._fail_all(emit, "the executor is shutting down")

    def _take_inbox(self, out: list[pb.RequestOutput]) -> None:
        requests, cancels = self.inbox.drain()
        for r in requests:
            self.counters.requests_received += 1
            err = check_request(r, self.limits)
            if err:
                self.counters.requests_failed += 1
                out.append(finished(r.id, pb.FINISH_REASON_ERROR, err))
            else:
                self.waiting.append(r)
        if cancels:
            gone = set(cancels)
            for rid in gone:
                if self.active.pop(rid, None) is not None:
                    self.counters.requests_cancelled += 1
                    out.append(finished(rid, pb.FINISH_REASON_CANCELLED))
            kept = [r for r in self.waiting if r.id not in gone]
            for r in self.waiting:
                if r.id in gone:
                    self.counters.requests_cancelled += 1
                    out.append(finished(r.id, pb.FINISH_REASON_CANCELLED))
            self.waiting = collections.deque(kept)

    def _fail_all(self, emit: Emit, message: str) -> None:
        out = [finished(rid, pb.FINISH_REASON_ERROR, message) for rid in self.active]
        out += [finished(r.id, pb.FINISH_REASON_ERROR, message) for r in self.waiting]
        self.active.clear()
        self.waiting.clear()
        if out:
            emit(out)

    def stats(self) -> pb.StatsResponse:
        c = self.counters
        active, queued, used_tokens = self._snapshot
        capacity_blocks = self.limits.max_batch_size * self.limits.max_total_tokens // BLOCK_SIZE
        used_blocks = -(-used_tokens // BLOCK_SIZE)
        return pb.StatsResponse(
            active_requests=active,
            queued_requests=queued,
            kv_blocks_used=used_blocks,
            kv_blocks_free=max(capacity_blocks - used_blocks, 0),
            kv_block_size=BLOCK_SIZE,
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
        self.inbox.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
