"""A model-free engine with a fixed cadence: one token per active request per iteration.

It exists to measure the stack alone, at the token rates TensorRT-LLM reaches, so an iteration
is built straight into one protobuf message. Token ids are deterministic, a function of the
prompt and the step (as a greedy model's are of its input), and never an eos id; requests beyond
the batch capacity wait, FIFO. A resumed request (GenerateRequest.resumed_tokens = N, migrated
from a lost executor) is keyed by its prompt less those N tokens and continues at step N, so it
emits what the first executor would have; its whole input, resumed tokens included, is its
prompt for the prefix cache and prefill.

Rollout control works as state, for load tests of the control path: memory tags are marked
released and resumed (generation is refused meanwhile, and requests live at a release are
failed, as a real engine must), updates advance the weight version (safetensors headers are
checked; pickles and CUDA IPC handles are not opened: there is no model to load them into), and
an in-place pause stops the loop stepping while it keeps its requests. Prompt log
probabilities, when asked, are deterministic too (`prompt_logprob`), on the request's first
output: no model scores anything.

Prefix caching is modelled (synthetic_prefix_cache.py), so that KV-aware routing is measurable
without a model: a request's prompt is matched against an LRU of blocks (the tokens matched are
its first output's `cached_tokens`), and the iteration in which requests join lasts longer by
the prefill of their uncached prompt tokens (`prefill_us_per_token` each), which delays every
token of that iteration, the joiners' first among them, as a prefill does in an engine without
chunked prefill. The blocks stored and evicted are published as KV-cache events.
"""

from __future__ import annotations

import array
import collections
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from tensorgate.executor.control import (
    KV_CACHE,
    MODEL,
    ControlConflict,
    ControlFeatures,
    ControlInvalid,
    ControlResult,
    noop_note,
    resolve_tags,
    update_source,
)
from tensorgate.executor.engine import (
    Emit,
    Engine,
    EngineFeatures,
    EngineInfo,
    EngineLimits,
    Inbox,
    add_finished,
    check_features,
    check_request,
)
from tensorgate.executor.engines.synthetic_prefix_cache import PrefixCache
from tensorgate.executor.kv_events import KV_EVENTS_KEPT, KvEventLog
from tensorgate.executor.live_requests import LiveRequests
from tensorgate.executor.settings import (
    DEFAULT_ITERATION_MS,
    DEFAULT_SYNTHETIC_BLOCK_SIZE,
    DEFAULT_SYNTHETIC_CACHE_BLOCKS,
    DEFAULT_SYNTHETIC_PREFILL_US_PER_TOKEN,
    DEFAULT_VOCAB_SIZE,
    EngineConfig,
)
from tensorgate.executor.weights import safetensors_header
from tensorgate.v1 import executor_pb2 as pb

MEMORY_TAGS = (KV_CACHE, MODEL)
_LENGTH = pb.FINISH_REASON_LENGTH
_STOP = pb.FINISH_REASON_STOP_TOKEN


@dataclass(slots=True)
class _Active:
    """A request taken in, waiting or running."""

    rid: int
    prompt_len: int
    max_new: int
    stop: frozenset[int] | None
    min_new: int = 0  # a stop token before this many tokens does not end the request
    generated: int = 0  # here, not counting resumed tokens
    key: int = 0  # the token stream's key: its prompt's (the same on every executor)
    step0: int = 0  # resumed tokens: the stream continues at this step
    prompt: list[float] | None = None  # prompt log probabilities, until the first output
    input_ids: list[int] | None = None  # kept for the prefix cache, until admission
    uncached: int = 0  # prompt tokens to prefill: set on admission


@dataclass(frozen=True)
class _Snapshot:
    """What Stats reads from another thread: published whole, never the live structures."""

    active: int = 0
    queued: int = 0
    used_tokens: int = 0


class SyntheticEngine(Engine):
    def __init__(
        self,
        iteration_ms: float = DEFAULT_ITERATION_MS,
        max_batch_size: int = 256,
        max_input_tokens: int = 4096,
        max_total_tokens: int = 8192,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        prefix_cache: bool = True,
        block_size: int = DEFAULT_SYNTHETIC_BLOCK_SIZE,
        cache_blocks: int = DEFAULT_SYNTHETIC_CACHE_BLOCKS,
        prefill_us_per_token: float = DEFAULT_SYNTHETIC_PREFILL_US_PER_TOKEN,
        kv_events_kept: int = KV_EVENTS_KEPT,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.period = iteration_ms / 1000.0
        self.block_size = block_size
        self.prefill_s_per_token = prefill_us_per_token / 1e6
        # None: prefix reuse off; every prompt token is prefilled and no event is published.
        self.kv_events = KvEventLog(kept=kv_events_kept) if prefix_cache else None
        self.prefix = (
            PrefixCache(block_size, cache_blocks, self.kv_events) if self.kv_events else None
        )
        self.vocab_size = vocab_size
        self.limits = EngineLimits(
            max_batch_size=max_batch_size,
            max_input_tokens=min(max_input_tokens, max_total_tokens - 1),
            max_total_tokens=max_total_tokens,
            max_num_tokens=max_batch_size * max_total_tokens,
        )
        self.inbox = Inbox()
        # Only the loop's thread touches these: no lock.
        self.live: LiveRequests[_Active] = LiveRequests(self.counters)  # waiting or running
        self.waiting: collections.deque[_Active] = collections.deque()
        self.active: dict[int, _Active] = {}  # running
        self._snapshot = _Snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Ordinary ids only: low ids are special tokens in most vocabularies.
        self._low = min(1000, vocab_size // 4)
        self._span = vocab_size - self._low
        self.features = EngineFeatures(
            stop_token_ids=True, min_new_tokens=True, ignore_eos=True, prompt_logprobs=True
        )
        # Control state: written by the control thread under the lock, read by the loop.
        self._control = threading.Lock()
        self._released: frozenset[str] = frozenset()  # replaced whole: the loop reads it
        self._paused = False
        self._parked = threading.Event()  # set by the loop once it holds in a pause
        self._buckets = 0  # CUDA IPC buckets since the last finalize

    @classmethod
    def from_config(cls, config: EngineConfig) -> SyntheticEngine:
        s = config.settings
        return cls(
            iteration_ms=s.iteration_ms,
            max_batch_size=s.max_batch_size or 256,
            max_input_tokens=s.max_input_tokens or 4096,
            max_total_tokens=s.max_total_tokens or 8192,
            vocab_size=s.vocab_size,
            prefix_cache=s.enable_kv_block_reuse,
            block_size=s.synthetic_block_size,
            cache_blocks=s.synthetic_cache_blocks,
            prefill_us_per_token=s.synthetic_prefill_us_per_token,
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
            # What it honours is about when a request ends: stop ids (after min_new_tokens),
            # and ignore_eos, trivially: it never emits an eos id.
            features=self.features,
        )

    def start(self, emit: Emit) -> None:
        self._thread = threading.Thread(target=self._loop, args=(emit,), name="synthetic")
        self._thread.start()

    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        self.inbox.put_requests(requests)

    def cancel(self, request_ids: list[int]) -> None:
        self.inbox.put_cancels(request_ids)

    def token(self, key: int, step: int) -> int:
        """The token at `step` (resumed tokens included) of the request whose prompt has the
        stream key `key` (`stream_key`)."""
        return self._low + (key * 7919 + step * 104729) % self._span

    def _loop(self, emit: Emit) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            if self._paused:
                # In place: take requests and cancellations, step nothing.
                self._parked.set()
                self._hold(emit)
                self.inbox.wake.wait(timeout=0.05)
                next_tick = time.monotonic()
                continue
            started = time.monotonic()
            stalled = self._iterate(emit)
            self.counters.last_iteration_ms = (time.monotonic() - started) * 1000
            if not self.active and not self.waiting:
                # Idle: sleep until work arrives rather than ticking at the cadence.
                self.inbox.wake.wait(timeout=0.5)
                next_tick = time.monotonic()
                continue
            next_tick += self.period + stalled
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_tick = time.monotonic()  # late: do not try to catch up in a burst
        self._fail_all(emit, "the executor is shutting down")

    def _hold(self, emit: Emit) -> None:
        batch = pb.IterationOutput()
        self._take_inbox(batch)
        if batch.outputs:
            emit(batch)

    def _iterate(self, emit: Emit) -> float:
        """One iteration; returns the seconds it spent on the joiners' prefill."""
        c = self.counters
        batch = pb.IterationOutput()
        self._take_inbox(batch)
        asleep = self._asleep()
        if asleep and self.live:
            self.live.fail_all(asleep, batch)
            self.active.clear()
            self.waiting.clear()
        # Joiners whose first output carries more than a token: (position among the outputs,
        # request, prompt tokens taken from the prefix cache).
        fresh: list[tuple[int, _Active, int]] = []
        prefill = 0
        while self.waiting and len(self.active) < self.limits.max_batch_size:
            a = self.waiting.popleft()
            cached = 0
            if a.input_ids is not None:
                # Matched now, not on arrival: what the requests admitted before it stored counts.
                cached = self.prefix.admit(a.input_ids)
                a.uncached = a.prompt_len - cached
            if a.prompt is not None or cached:
                fresh.append((len(self.active), a, cached))
            prefill += a.uncached
            self.active[a.rid] = a
        stalled = prefill * self.prefill_s_per_token
        if stalled > 0:
            # The joiners' prefill: this iteration's tokens (their first) come out that much later.
            self._stop.wait(stalled)
        base = len(batch.outputs)
        # The hot loop: field-by-field on `add()` is the cheapest way to build the message.
        add = batch.outputs.add
        low, span = self._low, self._span
        done = []
        for a in self.active.values():
            step = a.generated
            tok = low + (a.key * 7919 + (a.step0 + step) * 104729) % span
            a.generated = step + 1
            out = add()
            out.request_id = a.rid
            out.token_ids.append(tok)
            if a.stop is not None and tok in a.stop and a.generated >= a.min_new:
                out.finish_reason = _STOP
                done.append((a.rid, _STOP))
            elif a.generated >= a.max_new:
                out.finish_reason = _LENGTH
                done.append((a.rid, _LENGTH))
        for at, a, cached in fresh:
            # Its first output: the hot loop added one per active request, in `active` order.
            out = batch.outputs[base + at]
            out.cached_tokens = cached
            if a.prompt is not None:
                out.prompt_logprobs.extend(a.prompt)
                a.prompt = None
        stepped = len(self.active)
        for rid, reason in done:
            a = self.active.pop(rid)
            self.live.finish(rid, reason)
            self._cache_generated(a)
        self._snapshot = _Snapshot(
            active=len(self.active),
            queued=len(self.waiting),
            used_tokens=sum(a.prompt_len + a.generated for a in self.active.values()),
        )
        c.tokens_generated += stepped
        c.iterations += 1
        if batch.outputs:
            emit(batch)
        return stalled

    def _cache_generated(self, a: _Active) -> None:
        """The blocks its generated tokens completed go into the prefix cache as it ends."""
        if a.input_ids is None or self.prefix is None:
            return
        b = self.block_size
        if (a.prompt_len + a.generated - 1) // b > a.prompt_len // b:
            steps = range(a.step0, a.step0 + a.generated)
            generated = [self.token(a.key, step) for step in steps]
            self.prefix.extend(a.input_ids, generated)
        a.input_ids = None

    def _take_inbox(self, batch: pb.IterationOutput) -> None:
        requests, cancels = self.inbox.drain()
        c = self.counters
        asleep = self._asleep()
        for r in requests:
            c.requests_received += 1
            err = asleep or check_request(r, self.limits) or check_features(r, self.features)
            if err:
                c.requests_failed += 1
                add_finished(batch, r.id, pb.FINISH_REASON_ERROR, err)
            elif r.id in self.live:
                c.requests_failed += 1
                add_finished(
                    batch, r.id, pb.FINISH_REASON_ERROR, f"request id {r.id} is already in flight"
                )
            else:
                stop = frozenset(r.stop_token_ids) if r.stop_token_ids else None
                a = _Active(r.id, len(r.input_ids), r.max_new_tokens, stop, r.min_new_tokens)
                a.key, a.step0 = stream_key(r.input_ids, r.resumed_tokens), r.resumed_tokens
                if r.return_prompt_logprobs:
                    ids = r.input_ids
                    a.prompt = [prompt_logprob(ids[i], i) for i in range(1, len(ids))]
                if self.prefix is not None:
                    a.input_ids = list(r.input_ids)
                else:
                    a.uncached = a.prompt_len
                self.live.add(r.id, a)
                self.waiting.append(a)
        if not cancels:
            return
        cancelled = self.live.cancel(cancels, batch)
        if not cancelled:
            return
        for rid, _ in cancelled:
            self.active.pop(rid, None)
        if len(self.live) < len(self.active) + len(self.waiting):
            self.waiting = collections.deque(a for a in self.waiting if a.rid in self.live)

    def _fail_all(self, emit: Emit, message: str) -> None:
        batch = pb.IterationOutput()
        self.live.fail_all(message, batch)
        self.active.clear()
        self.waiting.clear()
        self._snapshot = _Snapshot()
        if batch.outputs:
            emit(batch)

    def stats(self) -> pb.StatsResponse:
        snap = self._snapshot
        # Blocks of the running requests, in the prefix-cache model's block size (the size its
        # events' blocks have, which a router hashing prompts needs).
        b = self.block_size
        capacity_blocks = self.limits.max_batch_size * self.limits.max_total_tokens // b
        used_blocks = -(-snap.used_tokens // b)
        return self.counters.to_proto(
            active=snap.active,
            queued=snap.queued,
            blocks_used=used_blocks,
            blocks_free=max(capacity_blocks - used_blocks, 0),
            block_size=b,
        )

    # -- rollout control (state only) -----------------------------------------------------------

    def _asleep(self) -> str:
        """Why generation is refused now ("" when it is not)."""
        released = self._released
        if not released:
            return ""
        return (
            f"the engine's memory is released ({', '.join(sorted(released))}): "
            "resume it (/resume_memory) before generating"
        )

    def control_features(self) -> ControlFeatures:
        return ControlFeatures(
            memory_tags=MEMORY_TAGS,
            update_from_disk=True,
            update_from_tensors=True,
            update_from_cuda_ipc=True,
            flush_cache=True,
            pause_in_place=True,
        )

    def released_memory_tags(self) -> list[str]:
        with self._control:
            return [t for t in MEMORY_TAGS if t in self._released]

    def release_memory(self, tags: list[str]) -> ControlResult:
        act, noop = resolve_tags(tags, MEMORY_TAGS)
        with self._control:
            if self._paused:
                raise ControlConflict(
                    "generation is paused in place: continue it before releasing memory (a "
                    "release ends every live request)"
                )
            self._released = self._released | set(act)
        if KV_CACHE in act and self.prefix is not None:
            self.prefix.clear()  # a released KV cache keeps no block
        self.inbox.wake.set()  # the loop fails what is live
        return ControlResult(
            message=f"released {', '.join(act) or 'nothing'} (synthetic: no memory is held, "
            f"generation is refused until resumed){noop_note(noop)}"
        )

    def resume_memory(self, tags: list[str]) -> ControlResult:
        act, noop = resolve_tags(tags, MEMORY_TAGS)
        with self._control:
            self._released = self._released - set(act)
        return ControlResult(message=f"resumed {', '.join(act) or 'nothing'}{noop_note(noop)}")

    def update_weights(self, request: pb.UpdateWeightsRequest) -> ControlResult:
        source = update_source(request)
        with self._control:
            if MODEL in self._released:
                raise ControlConflict(
                    "the weights are released: resume 'model' (/resume_memory) before updating"
                )
        tensors = 0
        if source == "cuda_ipc":
            if not request.cuda_ipc.handles_by_gpu:
                raise ControlInvalid("cuda_ipc carries no handles")
            with self._control:
                self._buckets += 1
            return ControlResult(
                message="bucket taken (synthetic: handles are not opened); it takes effect "
                "at finalize"
            )
        if source == "model_path":
            if not Path(request.model_path).is_dir():
                raise ControlInvalid(f"model_path {request.model_path!r} is not a directory")
        elif source == "tensors":
            tensors = self._count_tensors(request.tensors)
        with self._control:
            self._buckets = 0
            version = self.versions.advance(request.weight_version)
        flushed = ""
        if request.flush_cache and self.prefix is not None:
            flushed = f"; prefix cache flushed: {self.prefix.clear()} cached block(s) dropped"
        return ControlResult(
            message=f"weights now {version!r} (synthetic: no model; {source}){flushed}",
            tensors_updated=tensors,
        )

    @staticmethod
    def _count_tensors(tensors: pb.SerializedTensors) -> int:
        fmt = tensors.format or "safetensors"
        if fmt not in ("safetensors", "pickle"):
            raise ControlInvalid(f"tensors.format {fmt!r}: use safetensors or pickle")
        if not tensors.payloads:
            raise ControlInvalid("tensors carries no payloads")
        if fmt == "pickle":
            return 0  # not opened here: no model to check it against
        return sum(len(safetensors_header(p)) for p in tensors.payloads)

    def kv_cache_event_batch(self) -> pb.KvCacheEventBatch | None:
        return self.kv_events.drain() if self.kv_events is not None else None

    def flush_cache(self) -> ControlResult:
        if self.prefix is None:
            return ControlResult(
                message="prefix reuse is off (--no-enable-kv-block-reuse): no "
                "prefix block is cached"
            )
        n = self.prefix.clear()
        return ControlResult(message=f"prefix cache flushed: {n} cached block(s) dropped")

    def pause_generation(self) -> ControlResult:
        with self._control:
            if self._released:
                raise ControlConflict("the engine's memory is released: nothing runs to pause")
            was = self._paused
            self._paused = True
        self.inbox.wake.set()
        # Answer once the loop holds (it finishes the iteration it is in).
        if not self._parked.wait(timeout=10):
            raise ControlConflict("the engine loop did not pause within 10 s")
        return ControlResult(message="already paused" if was else "paused in place")

    def continue_generation(self) -> ControlResult:
        with self._control:
            was = self._paused
            self._paused = False
            self._parked.clear()
        self.inbox.wake.set()
        return ControlResult(message="continued" if was else "was not paused")

    def shutdown(self) -> None:
        with self._control:
            self._paused = False
        self._stop.set()
        self.inbox.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def stream_key(input_ids, resumed_tokens: int = 0) -> int:
    """The key of a request's token stream: a checksum of its prompt (its input less the
    tokens it resumes with). A checksum, not the ids themselves: one pass in C per request."""
    prompt = input_ids[: len(input_ids) - resumed_tokens]
    return zlib.crc32(array.array("I", prompt).tobytes())


def prompt_logprob(token: int, position: int) -> float:
    """The synthetic engine's log probability of prompt token `token` at `position` (>= 1): one of
    -0.25, -0.5, ..., -2.0, fixed by the two, so tests and benchmarks can predict it."""
    return -(1 + (token + position) % 8) / 4
