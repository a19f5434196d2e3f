"""KV-cache events on the contract: the TensorRT-LLM event shape converted to
`KvCacheEventBatch`, and the executor's `KvCacheEvents` stream over a real unix socket."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.executor.kv_events import batch_from_trtllm
from tensorgate.executor.server import serve
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)


def test_trtllm_events_become_the_contract():
    batch = batch_from_trtllm(
        [
            {"event_id": 1, "data": {"type": "created", "num_blocks_per_cache_level": [8]}},
            {
                "event_id": 2,
                "data": {
                    "type": "stored",
                    "parent_hash": -5,
                    "blocks": [
                        {
                            "type": "stored_block",
                            "block_hash": 11,
                            "tokens": [{"type": "unique_token", "token_id": t} for t in (1, 2)],
                        }
                    ],
                },
            },
            {"event_id": 3, "data": {"type": "removed", "block_hashes": [11, 12]}},
            {"event_id": 4, "data": {"type": "updated", "block_hash": 11}},
        ]
    )
    # Bookkeeping events (created, updated) carry nothing routable but keep their ids, so
    # the ids stay contiguous: a router reads a gap as lost events.
    assert [e.event_id for e in batch.events] == [1, 2, 3, 4]
    assert [e.WhichOneof("kind") for e in batch.events] == [None, "stored", "removed", None]
    stored = batch.events[1].stored
    assert stored.parent_hash == (1 << 64) - 5  # size_t bits
    assert [(b.block_hash, list(b.token_ids)) for b in stored.blocks] == [(11, [1, 2])]
    assert list(batch.events[2].removed.block_hashes) == [11, 12]
    root = batch_from_trtllm([{"event_id": 9, "data": {"type": "stored", "parent_hash": None}}])
    assert not root.events[0].stored.HasField("parent_hash")


class PublishingEngine(SyntheticEngine):
    """The synthetic engine with a scripted event buffer, to drive the server's stream."""

    def __init__(self, batches: list[pb.KvCacheEventBatch]):
        super().__init__(iteration_ms=5, max_batch_size=4, vocab_size=100)
        self._batches = batches
        self._lock = threading.Lock()

    def kv_cache_event_batch(self):
        with self._lock:
            return self._batches.pop(0) if self._batches else pb.KvCacheEventBatch()


def serving(engine, tmp_path):
    sock = tmp_path / "executor.sock"
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(engine, sock, None, stop),), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    channel = grpc.insecure_channel(f"unix:{sock}")
    grpc.channel_ready_future(channel).result(timeout=10)

    def close():
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)

    return pb_grpc.ExecutorStub(channel), close


def test_an_engine_without_events_answers_unimplemented(tmp_path):
    # The synthetic engine with prefix reuse off publishes none.
    engine = SyntheticEngine(iteration_ms=5, max_batch_size=4, vocab_size=100, prefix_cache=False)
    stub, close = serving(engine, tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.KvCacheEvents(pb.KvCacheEventsRequest(), timeout=10)))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "synthetic" in e.value.details()
    finally:
        close()


def test_events_stream_in_order_and_empty_polls_send_nothing(tmp_path):
    def batch(*ids):
        b = pb.KvCacheEventBatch()
        for i in ids:
            b.events.add(event_id=i).removed.block_hashes.append(i)
        return b

    engine = PublishingEngine([batch(1, 2), pb.KvCacheEventBatch(), batch(3)])
    stub, close = serving(engine, tmp_path)
    try:
        stream = stub.KvCacheEvents(pb.KvCacheEventsRequest(), timeout=10)
        got = [next(stream), next(stream)]
        stream.cancel()
        assert [[e.event_id for e in b.events] for b in got] == [[1, 2], [3]]
    finally:
        close()
