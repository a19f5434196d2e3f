"""The synthetic engine: cadence, batching, FIFO queueing, cancellation, limits, throughput."""

from __future__ import annotations

import time

import pytest

from tensorgate.executor.engines.synthetic import SyntheticEngine, stream_key
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def req(rid: int, n: int = 4, prompt: int = 3, stop=()) -> pb.GenerateRequest:
    """Request `rid`, whose prompt starts with its id: requests' prompts (and tokens) differ."""
    return pb.GenerateRequest(
        id=rid, input_ids=prompt_of(rid, prompt), max_new_tokens=n, stop_token_ids=stop
    )


def prompt_of(rid: int, prompt: int = 3) -> list[int]:
    return [rid, *range(1, prompt)][:prompt]


def key(rid: int, prompt: int = 3) -> int:
    """The token stream key of `req(rid, prompt=prompt)`."""
    return stream_key(prompt_of(rid, prompt))


@pytest.fixture
def run_engine(collector):
    engines = []

    def start(**kwargs) -> SyntheticEngine:
        engine = SyntheticEngine(**kwargs)
        engine.start(collector.emit)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.shutdown()


def test_one_token_per_request_per_iteration(run_engine, collector):
    engine = run_engine(iteration_ms=10, max_batch_size=8)
    engine.submit([req(1, n=5), req(2, n=5)])
    collector.wait_finished([1, 2])
    assert len(collector.tokens[1]) == len(collector.tokens[2]) == 5
    assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_LENGTH
    # Both advance in the same iterations: 5 messages, not 10.
    assert collector.batches == 5
    # Deterministic, different per request, inside the vocabulary.
    assert collector.tokens[1] == [engine.token(key(1), s) for s in range(5)]
    assert collector.tokens[1] != collector.tokens[2]
    assert all(0 <= t < engine.vocab_size for t in collector.tokens[1] + collector.tokens[2])


def test_cadence_is_the_iteration_time(run_engine, collector):
    engine = run_engine(iteration_ms=20, max_batch_size=8)
    start = time.monotonic()
    engine.submit([req(1, n=10)])
    collector.wait_finished([1])
    elapsed = time.monotonic() - start
    # 10 iterations at 20 ms: the first is immediate, so at least 9 periods.
    assert elapsed >= 0.18
    assert engine.stats().iterations >= 10


def test_batch_capacity_queues_the_rest_fifo(run_engine, collector):
    engine = run_engine(iteration_ms=20, max_batch_size=2)
    engine.submit([req(i, n=3) for i in range(1, 6)])
    collector.wait_tokens(1, 1)
    stats = engine.stats()
    assert stats.active_requests == 2
    assert stats.queued_requests == 3
    collector.wait_finished(list(range(1, 6)))
    assert all(len(collector.tokens[i]) == 3 for i in range(1, 6))
    first = collector.first_batch
    # Requests 1 and 2 run at once; 3 and 4 only once they are done; 5 last.
    assert first[1] == first[2] < first[3] == first[4] < first[5]
    assert first[3] - first[1] == 3
    assert engine.stats().requests_finished == 5


def test_cancel_ends_with_cancelled_and_counts(run_engine, collector):
    engine = run_engine(iteration_ms=5, max_batch_size=1)
    engine.submit([req(1, n=5000), req(2, n=5000)])  # 2 waits in the queue
    collector.wait_tokens(1, 3)
    engine.cancel([1, 2, 999])  # an unknown id is ignored
    collector.wait_finished([1, 2])
    time.sleep(0.05)
    stats = engine.stats()
    assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_CANCELLED
    assert collector.tokens.get(2, []) == []
    assert stats.requests_cancelled == 2
    assert stats.active_requests == 0 and stats.queued_requests == 0


def test_stop_token_ids_end_generation(run_engine, collector):
    engine = run_engine(iteration_ms=1)
    stop_at = engine.token(key(1), 3)
    engine.submit([req(1, n=50, stop=[stop_at])])
    collector.wait_finished([1])
    assert collector.tokens[1] == [engine.token(key(1), s) for s in range(4)]
    assert collector.finish[1] == pb.FINISH_REASON_STOP_TOKEN


def test_requests_over_the_limits_fail_with_the_limit(run_engine, collector):
    engine = run_engine(iteration_ms=5, max_input_tokens=4, max_total_tokens=8)
    bad_top_n = req(4, n=2)
    bad_top_n.top_n_tokens = 3
    engine.submit([req(1, n=2, prompt=5), req(2, n=6, prompt=4), req(3, n=2, prompt=0), bad_top_n])
    collector.wait_finished([1, 2, 3, 4])
    assert set(collector.finish.values()) == {pb.FINISH_REASON_ERROR}
    assert "max_input_tokens is 4" in collector.errors[1]
    assert "max_total_tokens of 8" in collector.errors[2]
    assert "empty" in collector.errors[3]
    assert "max_top_n_tokens is 0" in collector.errors[4]
    assert engine.stats().requests_failed == 4


def test_shutdown_fails_live_requests(collector):
    engine = SyntheticEngine(iteration_ms=5)
    engine.start(collector.emit)
    engine.submit([req(1, n=5000)])
    collector.wait_tokens(1, 1)
    engine.shutdown()
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "shutting down" in collector.errors[1]


def test_sustains_tens_of_thousands_of_tokens_per_second(run_engine, collector):
    # No cadence: this measures the cost of building iterations, the engine's own overhead.
    engine = run_engine(iteration_ms=0, max_batch_size=1024)
    n = 40
    start = time.monotonic()
    engine.submit([req(i, n=n) for i in range(1, 1025)])
    collector.wait_finished(list(range(1, 1025)))
    rate = 1024 * n / (time.monotonic() - start)
    assert sum(len(t) for t in collector.tokens.values()) == 1024 * n
    assert collector.batches <= n + 1  # one message per iteration
    assert rate > 20_000, f"{rate:.0f} tokens/s"


def test_min_new_tokens_holds_off_stop_tokens(run_engine, collector):
    engine = run_engine(iteration_ms=1, max_batch_size=8)
    early, late = engine.token(key(1), 1), engine.token(key(1), 5)
    r = req(1, n=10, stop=(early, late))
    r.min_new_tokens = 4
    engine.submit([r, req(2, n=10, stop=(engine.token(key(2), 1),))])
    collector.wait_finished([1, 2])
    # The stop id at step 1 comes before min_new_tokens: it is emitted and generation goes on.
    assert collector.tokens[1] == [engine.token(key(1), s) for s in range(6)]
    assert collector.finish[1] == pb.FINISH_REASON_STOP_TOKEN
    assert len(collector.tokens[2]) == 2 and collector.finish[2] == pb.FINISH_REASON_STOP_TOKEN


def test_claims_only_what_it_honours_and_refuses_the_rest(run_engine, collector):
    engine = run_engine(iteration_ms=1, max_batch_size=8)
    f = engine.info().features
    assert f.stop_token_ids and f.min_new_tokens and f.ignore_eos
    assert not (f.guided_decoding or f.logit_bias or f.repetition_penalty or f.typical_p)
    ignoring = req(1, n=3)
    ignoring.ignore_eos = True
    biased = req(2, n=3)
    biased.logit_bias[engine.token(key(2), 0)] = -100.0
    guided = req(3, n=3)
    guided.grammar.kind = pb.GRAMMAR_KIND_REGEX
    guided.grammar.value = "[a-z]+"
    engine.submit([ignoring, biased, guided])
    collector.wait_finished([1, 2, 3])
    assert collector.finish[1] == pb.FINISH_REASON_LENGTH and len(collector.tokens[1]) == 3
    assert collector.finish[2] == collector.finish[3] == pb.FINISH_REASON_ERROR
    assert "logit_bias is not supported" in collector.errors[2]
    assert "grammar is not supported" in collector.errors[3]
    assert collector.tokens[2] == collector.tokens[3] == []
