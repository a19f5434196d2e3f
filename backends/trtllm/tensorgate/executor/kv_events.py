"""KV-cache events on the contract (`KvCacheEventBatch`), from what an engine publishes.

TensorRT-LLM serializes its events (`tensorrt_llm/_utils.py`, `KVCacheEventSerializer`) as
`{"event_id", "data": {"type": ...}, "window_size"}` with `type` one of "stored" (`parent_hash`,
`blocks[]` each with `block_hash` and `tokens[].token_id`), "removed" (`block_hashes`),
"created" and "updated" (cache-level bookkeeping, nothing a router can route on: sent with no
kind, so that their ids keep the sequence contiguous).

Engines that track their blocks themselves (synthetic, transformers) publish through `KvEventLog`:
increasing event ids, a bounded buffer that drops its oldest events when full (the gap in the ids
tells the router it missed some), drained by the server's `KvCacheEvents` stream. Events are kept
only while someone reads them: with no stream draining for KV_EVENTS_UNREAD_S (no router
subscribed, as with one executor behind one router today), an event takes its id and is not
kept, so an unread executor holds no events (a 60 s soak grew 34 MiB before this rule).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence

from tensorgate.v1 import executor_pb2 as pb

_U64 = (1 << 64) - 1

# Events kept for a router that reads them late (or not yet): beyond this the oldest are dropped.
KV_EVENTS_KEPT = 65_536
# Most events in one stream message: ~100 bytes each, well under gRPC's 4 MiB default.
KV_EVENTS_PER_BATCH = 4096
# Without a drain for this long (the server's stream drains every 50 ms), nobody is reading:
# events are no longer kept. A log is read from its creation until this passes.
KV_EVENTS_UNREAD_S = 10.0


def _hash(h: int) -> int:
    # C++ size_t on the wire; a signed rendering (Python's hash() in tests) maps to the same bits.
    return int(h) & _U64


def batch_from_trtllm(events: Iterable[dict]) -> pb.KvCacheEventBatch:
    batch = pb.KvCacheEventBatch()
    for e in events:
        data = e.get("data") or {}
        kind = data.get("type")
        if kind == "stored":
            ev = batch.events.add(event_id=int(e.get("event_id", 0)))
            ev.stored.SetInParent()
            if data.get("parent_hash") is not None:
                ev.stored.parent_hash = _hash(data["parent_hash"])
            for b in data.get("blocks") or []:
                ev.stored.blocks.add(
                    block_hash=_hash(b["block_hash"]),
                    token_ids=[int(t["token_id"]) for t in b.get("tokens") or []],
                )
        elif kind == "removed":
            ev = batch.events.add(event_id=int(e.get("event_id", 0)))
            ev.removed.block_hashes.extend(_hash(h) for h in data.get("block_hashes") or [])
        elif kind == "cleared":
            batch.events.add(event_id=int(e.get("event_id", 0)), all_cleared=True)
        else:
            # "created" / "updated" (and any later kind) change nothing a router indexes, but
            # they take an id (kvCacheEventManager.cpp: mEventId++ for every kind): sent with
            # no kind, so the ids stay contiguous and a real loss still shows as a gap.
            batch.events.add(event_id=int(e.get("event_id", 0)))
    return batch


class KvEventLog:
    """The events an engine published and no stream has taken yet, oldest first. Thread-safe:
    engines publish from their loop or control threads, the server drains from its own."""

    def __init__(
        self,
        kept: int = KV_EVENTS_KEPT,
        per_batch: int = KV_EVENTS_PER_BATCH,
        unread_s: float = KV_EVENTS_UNREAD_S,
        clock=time.monotonic,
    ) -> None:
        if kept < 1 or per_batch < 1:
            raise ValueError(f"kept ({kept}) and per_batch ({per_batch}) must be positive")
        self._lock = threading.Lock()
        self._events: deque[pb.KvCacheEvent] = deque(maxlen=kept)
        self._per_batch = per_batch
        self._next_id = 1
        self._unread_s = unread_s
        self._clock = clock
        self._last_drain = clock()
        self.dropped = 0  # events lost to a full buffer, for tests and logs
        self.unread = 0  # events not kept because nobody was reading

    def _add(self) -> pb.KvCacheEvent:
        # Under the lock. A full deque drops its oldest on append: the gap the contract names.
        ev = pb.KvCacheEvent(event_id=self._next_id)
        self._next_id += 1
        if self._clock() - self._last_drain > self._unread_s:
            # Nobody reads: the event takes its id (a later reader starts from a later one)
            # and is filled in and thrown away by the caller.
            self._events.clear()
            self.unread += 1
            return ev
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(ev)
        return ev

    def stored(self, parent: int | None, blocks: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Blocks (hash, tokens) stored in sequence order, the first continuing `parent`."""
        if not blocks:
            return
        with self._lock:
            ev = self._add()
            ev.stored.SetInParent()
            if parent is not None:
                ev.stored.parent_hash = parent
            for h, tokens in blocks:
                ev.stored.blocks.add(block_hash=h, token_ids=tokens)

    def removed(self, hashes: Iterable[int]) -> None:
        hashes = list(hashes)
        if not hashes:
            return
        with self._lock:
            self._add().removed.block_hashes.extend(hashes)

    def cleared(self) -> None:
        with self._lock:
            self._add().all_cleared = True

    def drain(self) -> pb.KvCacheEventBatch:
        """Up to KV_EVENTS_PER_BATCH of the oldest events, taken out of the buffer."""
        batch = pb.KvCacheEventBatch()
        with self._lock:
            self._last_drain = self._clock()
            n = min(len(self._events), self._per_batch)
            taken = [self._events.popleft() for _ in range(n)]
        batch.events.extend(taken)
        return batch
