"""The transformers engine's KV-cache events over the real gRPC server: what its paged cache's
prefix ledger really holds (a replica built from the events alone equals it, evictions
included), each stored block with the tokens it holds and its parent, all_cleared on a flush
and on a kv_cache release, and no events with prefix sharing off."""

from __future__ import annotations

import queue

import grpc
import pytest
from test_kv_blocks import Replica
from test_kv_events import serving
from test_server import Stream
from test_synthetic_kv_events import Events

from tensorgate.executor.engines.transformers_engine import TransformersEngine, TransformersSettings
from tensorgate.executor.kv_blocks import chain_hashes
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(300)

BLOCK = 16


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    # The tiny model's default cache (16 blocks of 16): a few requests evict.
    engine = TransformersEngine(
        tiny_llama_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=BLOCK)
    )
    stub, close = serving(engine, tmp_path_factory.mktemp("kv"))
    events = Events(stub)
    yield stub, engine, events
    events.close()
    close()


def ledger(engine) -> set[int]:
    (allocator,) = engine.manager.batch_processor.cache.cache_allocators.values()
    return set(allocator.ledger.hash_to_block)


def quiet(events: Events, settle: float = 0.3) -> list[pb.KvCacheEvent]:
    """Every event the stream brings until it is quiet for `settle` s."""
    got = []
    while True:
        try:
            got.append(events.q.get(timeout=settle))
        except queue.Empty:
            return got


def absorb(replica: Replica, events: Events) -> list[pb.KvCacheEvent]:
    # The replica checks that ids follow on and that every block's hash is its tokens'.
    return replica.apply_events(quiet(events))


def generate(stub, rid: int, prompt: list[int], n: int) -> list[int]:
    stream = Stream(stub)
    req = pb.GenerateRequest(id=rid, input_ids=prompt, max_new_tokens=n, ignore_eos=True)
    stream.send(pb.GenerateCommand(requests=[req]))
    stream.read_until(lambda: rid in stream.finish)
    stream.send(None)
    assert stream.finish[rid] == pb.FINISH_REASON_LENGTH, stream.errors
    return stream.tokens[rid]


def prompt_of(seed: int, n: int) -> list[int]:
    return [6 + (seed * 13 + i) % 120 for i in range(n)]


def test_the_events_mirror_the_ledger_with_tokens_and_parents(server):
    stub, engine, events = server
    replica = Replica()
    prompt = prompt_of(1, 40)
    generated = generate(stub, 1, prompt, 12)
    got = absorb(replica, events)
    # 40 + 11 tokens have KV (the last generated one does not): three full blocks, the third
    # completed by generated tokens.
    sequence = prompt + generated[:-1]
    hashes = chain_hashes(sequence, BLOCK)
    stored = [
        (b.block_hash, list(b.token_ids))
        for e in got
        if e.HasField("stored")
        for b in e.stored.blocks
    ]
    assert stored == [(h, sequence[i * BLOCK : (i + 1) * BLOCK]) for i, h in enumerate(hashes)]
    assert replica.blocks == ledger(engine) == set(hashes)

    # The same prompt again: its blocks are shared, not stored anew.
    again = generate(stub, 2, prompt, 12)
    assert again == generated
    assert not absorb(replica, events)

    # More distinct prompts than the 16-block cache holds: evictions, and the replica still
    # equals what the cache holds.
    for rid in range(3, 9):
        generate(stub, rid, prompt_of(rid, 90), 20)
    got = absorb(replica, events)
    assert any(e.HasField("removed") for e in got)
    assert replica.blocks == ledger(engine)


def test_flush_and_a_kv_cache_release_publish_all_cleared(server):
    stub, engine, events = server
    generate(stub, 20, prompt_of(20, 40), 4)
    quiet(events)  # what the test before left, and this request's blocks
    replica = Replica()
    replica.blocks = ledger(engine)
    assert replica.blocks
    stub.FlushCache(pb.FlushCacheRequest())
    got = absorb(replica, events)
    assert [e.all_cleared for e in got] == [True]
    assert ledger(engine) == set()

    stub.ReleaseMemory(pb.MemoryRequest(tags=["kv_cache"]))
    got = absorb(replica, events)
    assert [e.all_cleared for e in got] == [True]
    stub.ResumeMemory(pb.MemoryRequest(tags=["kv_cache"]))
    generate(stub, 21, prompt_of(20, 40), 4)
    got = absorb(replica, events)
    assert [len(e.stored.blocks) for e in got] == [2]  # stored anew in the new cache
    assert replica.blocks == ledger(engine)


def test_no_prefix_sharing_no_events(tiny_llama_dir, tmp_path):
    engine = TransformersEngine(
        tiny_llama_dir,
        TransformersSettings(
            device="cpu", max_batch_size=2, block_size=BLOCK, prefix_sharing=False
        ),
    )
    stub, close = serving(engine, tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.KvCacheEvents(pb.KvCacheEventsRequest(), timeout=10)))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert engine.manager.batch_processor.cache.use_prefix_sharing is False
    finally:
        close()
