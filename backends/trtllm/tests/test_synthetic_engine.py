from __future__ import annotations

import time

from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.v1 import executor_pb2 as pb


def req(rid: int, n: int = 4, prompt: int = 3) -> pb.GenerateRequest:
    return pb.GenerateRequest(id=rid, input_ids=list(range(1, prompt + 1)), max_new_tokens=n)


def test_one_token_per_request_per_iteration(collector):
    engine = SyntheticEngine(iteration_ms=10, max_batch_size=8)
    engine.start(collector.emit)
    try:
        engine.submit([req(1, n=5), req(2, n=5)])
        collector.wait_finished([1, 2])
    finally:
        engine.shutdown()
    assert len(collector.tokens[1]) == len(collector.tokens[2]) == 5
    assert collector.finish[1] == pb.FINISH_REASON_LENGTH
    # Both advance in the same iterations: 5 batches, not 10.
    assert collector.batches == 5
    # Deterministic and inside the vocabulary.
    assert collector.tokens[1] == [engine.token(1, s) for s in range(5)]
    assert all(0 <= t < engine.vocab_size for t in collector.tokens[1])


def test_cadence_is_the_iteration_time(collector):
    engine = SyntheticEngine(iteration_ms=20, max_batch_size=8)
    engine.start(collector.emit)
    try:
        start = time.monotonic()
        engine.submit([req(1, n=10)])
        collector.wait_finished([1])
        elapsed = time.monotonic() - start
    finally:
        engine.shutdown()
    # 10 iterations at 20 ms: the first is immediate, so at least 9 periods.
    assert elapsed >= 0.18


def test_batch_capacity_queues_the_rest(collector):
    engine = SyntheticEngine(iteration_ms=5, max_batch_size=2)
    engine.start(collector.emit)
    try:
        engine.submit([req(i, n=3) for i in range(1, 6)])
        time.sleep(0.005)
        stats = engine.stats()
        assert stats.active_requests <= 2
        collector.wait_finished(list(range(1, 6)))
    finally:
        engine.shutdown()
    assert all(len(collector.tokens[i]) == 3 for i in range(1, 6))
    assert engine.stats().requests_finished == 5


def test_cancel_ends_with_cancelled_and_counts(collector):
    engine = SyntheticEngine(iteration_ms=5, max_batch_size=4)
    engine.start(collector.emit)
    try:
        engine.submit([req(1, n=5000)])
        collector.wait_tokens(1, 3)
        engine.cancel([1, 999])  # an unknown id is ignored
        collector.wait_finished([1])
        time.sleep(0.05)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert collector.finish[1] == pb.FINISH_REASON_CANCELLED
    assert stats.requests_cancelled == 1
    assert stats.active_requests == 0


def test_requests_over_the_limits_fail_with_the_limit(collector):
    engine = SyntheticEngine(iteration_ms=5, max_input_tokens=4, max_total_tokens=8)
    engine.start(collector.emit)
    try:
        engine.submit([req(1, n=2, prompt=5), req(2, n=6, prompt=4), req(3, n=2, prompt=0)])
        collector.wait_finished([1, 2, 3])
    finally:
        engine.shutdown()
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "max_input_tokens is 4" in collector.errors[1]
    assert "max_total_tokens of 8" in collector.errors[2]
    assert "empty" in collector.errors[3]
