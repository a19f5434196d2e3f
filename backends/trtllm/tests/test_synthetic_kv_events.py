"""The synthetic engine's prefix-cache model over the real gRPC server: its KV-cache events on
the KvCacheEvents stream (stored, removed, all_cleared, ids), and a cached prefix shortening
time to first token by the modelled prefill."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from test_kv_events import serving
from test_server import Stream

from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.executor.kv_blocks import chain_hashes
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(120)

BLOCK = 16


def engine(**kwargs) -> SyntheticEngine:
    args = {"iteration_ms": 5, "max_batch_size": 8, "vocab_size": 50_000, "block_size": BLOCK}
    return SyntheticEngine(**(args | kwargs))


class Events:
    """The KvCacheEvents stream, read in a thread into a queue."""

    def __init__(self, stub) -> None:
        self.call = stub.KvCacheEvents(pb.KvCacheEventsRequest(), timeout=60)
        self.q: queue.Queue[pb.KvCacheEvent] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                for ev in batch.events:
                    self.q.put(ev)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def take(self, n: int, timeout: float = 10) -> list[pb.KvCacheEvent]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            out.append(self.q.get(timeout=max(deadline - time.monotonic(), 0.01)))
        return out

    def none_within(self, seconds: float) -> bool:
        try:
            self.q.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.call.cancel()


def run(stub, rid: int, prompt: list[int], n: int = 1) -> float:
    """One request to its end; returns its time to first token in seconds."""
    stream = Stream(stub)
    sent = time.monotonic()
    stream.send(
        pb.GenerateCommand(
            requests=[pb.GenerateRequest(id=rid, input_ids=prompt, max_new_tokens=n)]
        )
    )
    ttft = None
    for it in stream.calls:
        stream.absorb(it)
        if ttft is None and stream.tokens.get(rid):
            ttft = time.monotonic() - sent
        if rid in stream.finish:
            break
    stream.send(None)
    assert stream.finish[rid] == pb.FINISH_REASON_LENGTH, stream.errors
    assert ttft is not None
    return ttft


def blocks_of(events: list[pb.KvCacheEvent]) -> list[tuple[int | None, int, list[int]]]:
    """(parent, hash, tokens) of every stored block, in order."""
    out = []
    for ev in events:
        assert ev.WhichOneof("kind") == "stored", ev
        parent = ev.stored.parent_hash if ev.stored.HasField("parent_hash") else None
        for b in ev.stored.blocks:
            out.append((parent, b.block_hash, list(b.token_ids)))
            parent = b.block_hash
    return out


def test_a_new_prompt_is_stored_block_by_block_with_its_chain(tmp_path):
    stub, close = serving(engine(), tmp_path)
    events = Events(stub)
    try:
        prompt = list(range(1000, 1000 + 5 * BLOCK + 3))
        run(stub, 1, prompt)
        hashes = chain_hashes(prompt, BLOCK)
        (ev,) = events.take(1)
        assert blocks_of([ev]) == [
            (hashes[i - 1] if i else None, hashes[i], prompt[i * BLOCK : (i + 1) * BLOCK])
            for i in range(5)
        ]
        # The same prompt again stores nothing new; a longer one stores only its new block,
        # continuing the cached chain.
        run(stub, 2, prompt)
        longer = prompt + list(range(20))
        run(stub, 3, longer)
        (ev,) = events.take(1)
        assert blocks_of([ev]) == [(hashes[4], chain_hashes(longer, BLOCK)[5], longer[80:96])]
        assert ev.event_id > 1
        assert events.none_within(0.3)
    finally:
        events.close()
        close()


def test_a_cached_prefix_comes_out_sooner_by_its_prefill(tmp_path):
    # 200 us per uncached token: the 2000-token prompt costs 0.4 s the first time, 3.2 ms
    # (its last, partial block) the second.
    stub, close = serving(engine(prefill_us_per_token=200), tmp_path)
    try:
        prompt = list(range(3000, 5000))
        cold = run(stub, 1, prompt)
        warm = run(stub, 2, prompt)
        other = run(stub, 3, list(range(6000, 8000)))
        assert cold >= 0.4
        assert other >= 0.4
        assert warm <= cold - 0.3, (cold, warm)
    finally:
        close()


def test_prefix_reuse_off_prefills_every_token(tmp_path):
    stub, close = serving(engine(prefill_us_per_token=200, prefix_cache=False), tmp_path)
    try:
        prompt = list(range(3000, 4000))
        assert run(stub, 1, prompt) >= 0.2
        assert run(stub, 2, prompt) >= 0.2
    finally:
        close()


def test_eviction_is_published_as_removed(tmp_path):
    stub, close = serving(engine(cache_blocks=4), tmp_path)
    events = Events(stub)
    try:
        a = list(range(100, 100 + 3 * BLOCK + 1))
        b = list(range(500, 500 + 3 * BLOCK + 1))
        run(stub, 1, a)
        run(stub, 2, b)
        ha = chain_hashes(a, BLOCK)
        first, stored_b, removed = events.take(3)
        assert [h for _, h, _ in blocks_of([first])] == ha
        assert [h for _, h, _ in blocks_of([stored_b])] == chain_hashes(b, BLOCK)
        # Two of a's blocks go, its last ones first: its first block stays reachable.
        assert list(removed.removed.block_hashes) == [ha[2], ha[1]]
        assert [first.event_id, stored_b.event_id, removed.event_id] == sorted(
            {first.event_id, stored_b.event_id, removed.event_id}
        )
    finally:
        events.close()
        close()


def test_flush_and_a_kv_cache_release_publish_all_cleared(tmp_path):
    stub, close = serving(engine(), tmp_path)
    events = Events(stub)
    try:
        run(stub, 1, list(range(2 * BLOCK + 1)))
        (stored,) = events.take(1)
        assert "2 cached block(s) dropped" in stub.FlushCache(pb.FlushCacheRequest()).message
        (cleared,) = events.take(1)
        assert cleared.all_cleared and cleared.event_id > stored.event_id
        stub.ReleaseMemory(pb.MemoryRequest(tags=["kv_cache"]))
        (released,) = events.take(1)
        assert released.all_cleared and released.event_id > cleared.event_id
        stub.ResumeMemory(pb.MemoryRequest(tags=["kv_cache"]))
        # Nothing survived: the prompt is stored again.
        run(stub, 2, list(range(2 * BLOCK + 1)))
        (again,) = events.take(1)
        assert blocks_of([again]) == blocks_of([stored])
    finally:
        events.close()
        close()


def test_a_full_buffer_drops_the_oldest_and_leaves_a_gap(tmp_path):
    eng = engine(kv_events_kept=3)
    stub, close = serving(eng, tmp_path)
    try:
        # Five prompts with nothing in common, before anyone reads: five stored events.
        for rid in range(5):
            run(stub, rid + 1, list(range(1000 * rid, 1000 * rid + BLOCK + 1)))
        events = Events(stub)
        got = events.take(3)
        assert [e.event_id for e in got] == [3, 4, 5]  # 1 and 2 were dropped
        run(stub, 9, list(range(9000, 9000 + BLOCK + 1)))
        (later,) = events.take(1)
        assert later.event_id == 6
        events.close()
    finally:
        close()
