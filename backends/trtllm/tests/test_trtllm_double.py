"""The TEST DOUBLE of `tensorrt_llm.bindings.executor` (tests/doubles; NOT TensorRT-LLM) is as
strict as the real bindings: each test pins one behaviour to the C++ it copies (cited in the
double's docstring), so that an engine test cannot pass only because the double is lenient."""

from __future__ import annotations

import datetime
import json

import pytest
from conftest import TRTLLM_ENGINES, make_trtllm_engine_dir

pytestmark = pytest.mark.timeout(60)

TP1 = TRTLLM_ENGINES / "llama-tp1-bf16"
WAIT = datetime.timedelta(seconds=5)


def _executor(t, engine_dir=TP1, **config):
    return t.Executor(engine_dir, t.ModelType.DECODER_ONLY, t.ExecutorConfig(**config))


def _final(ex, tid):
    """Every response of one request up to its last (an error or a final result)."""
    got = []
    while True:
        responses = ex.await_responses(tid, timeout=WAIT)
        assert responses, "no response"
        got += responses
        last = responses[-1]
        if last.has_error() or last.result.is_final:
            return got


def test_request_constructor_checks_like_request_impl_validate(trtllm_double):
    t = trtllm_double
    with pytest.raises(RuntimeError, match=r"mInputTokenIds\.empty"):
        t.Request([], 4)
    with pytest.raises(RuntimeError, match="mMaxNewTokens > 0"):
        t.Request([1], 0)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.01])
def test_sampling_config_top_p_must_be_in_0_1(trtllm_double, top_p):
    with pytest.raises(RuntimeError, match="topP"):
        trtllm_double.SamplingConfig(1, top_p=top_p)
    assert trtllm_double.SamplingConfig(1, top_p=1.0).top_p == 1.0


def test_engine_limits_fail_the_response_not_enqueue(trtllm_double):
    t = trtllm_double
    ex = _executor(t, enable_chunked_context=True)
    try:
        assert ex.max_input_len == 8191  # chunked context: max_seq_len - 1
        too_long = ex.enqueue_request(t.Request([1] * 8192, 1, streaming=True))
        bad_end = ex.enqueue_request(t.Request([1], 1, streaming=True, end_id=128256))
        ok = ex.enqueue_request(t.Request([1], 2, streaming=True, end_id=-1))
        (r,) = _final(ex, too_long)
        assert r.has_error() and "Prompt length (8192) exceeds maximum input length (8191)" in (
            r.error_msg
        )
        assert r.error_msg.startswith("Encountered an error when fetching new request")
        (r,) = _final(ex, bad_end)
        assert r.has_error() and "EndId (128256) is not within acceptable range" in r.error_msg
        assert not _final(ex, ok)[-1].has_error()
    finally:
        ex.shutdown()


def test_chunked_context_needs_paged_context_fmha(trtllm_double, tmp_path):
    t = trtllm_double
    d = make_trtllm_engine_dir(tmp_path, max_num_tokens=2048)
    data = json.loads((d / "config.json").read_text())
    data["build_config"]["plugin_config"]["use_paged_context_fmha"] = False
    (d / "config.json").write_text(json.dumps(data))
    ex = _executor(t, d, enable_chunked_context=True)
    try:
        assert not ex.chunked_context
        assert ex.max_input_len == 2048  # min(max_seq_len - 1, max_num_tokens)
    finally:
        ex.shutdown()


def test_streaming_under_max_utilization_needs_chunked_context(trtllm_double):
    t = trtllm_double
    policy = t.SchedulerConfig(t.CapacitySchedulerPolicy.MAX_UTILIZATION)
    ex = _executor(t, scheduler_config=policy)  # chunked context off
    try:
        # prompt + max_tokens - 1 > max input length (8191): refused as it is scheduled.
        long = ex.enqueue_request(t.Request([1] * 100, 8100, streaming=True))
        short = ex.enqueue_request(t.Request([1] * 100, 3, streaming=True))
        (r,) = _final(ex, long)
        assert r.has_error() and "context chunking is enabled" in r.error_msg
        assert not _final(ex, short)[-1].has_error()
    finally:
        ex.shutdown()
    ex = _executor(t, scheduler_config=policy, enable_chunked_context=True)
    try:
        tid = ex.enqueue_request(t.Request([1] * 100, 8000, streaming=True))
        first = ex.await_responses(tid, timeout=WAIT)
        assert not first[0].has_error()
        ex.cancel_request(tid)
    finally:
        ex.shutdown()


def test_calls_after_shutdown_raise(trtllm_double):
    t = trtllm_double
    ex = _executor(t)
    assert ex.can_enqueue_requests()
    ex.shutdown()
    assert not ex.can_enqueue_requests()
    with pytest.raises(RuntimeError, match="Shutdown called, cannot enqueue"):
        ex.enqueue_request(t.Request([1], 1))
    for call in (
        lambda: ex.await_responses(timeout=WAIT),
        lambda: ex.cancel_request(1),
        lambda: ex.get_num_responses_ready(),
        lambda: ex.get_latest_iteration_stats(),
    ):
        with pytest.raises(RuntimeError, match="Shutdown called"):
            call()
    ex.shutdown()  # a second call returns


def test_a_non_leader_rank_cannot_use_the_api(trtllm_double):
    t = trtllm_double
    t.TEST_DOUBLE.can_enqueue = False
    ex = _executor(t)
    try:
        assert not ex.can_enqueue_requests()
        with pytest.raises(RuntimeError, match="not the leader"):
            ex.enqueue_request(t.Request([1], 1))
        with pytest.raises(RuntimeError, match="not the leader"):
            ex.get_latest_iteration_stats()
    finally:
        ex.shutdown()


def test_streamed_log_probs_are_cumulative(trtllm_double):
    t = trtllm_double
    ex = _executor(t)
    try:
        lp = t.OutputConfig(return_log_probs=True)
        tid = ex.enqueue_request(t.Request([1, 2], 4, streaming=True, output_config=lp))
        responses = _final(ex, tid)
        seen = 0
        for r in responses:
            seen += len(r.result.output_token_ids[0])
            assert len(r.result.output_token_ids[0]) == 1  # the new token only
            assert len(r.result.log_probs[0]) == seen  # every token's so far
    finally:
        ex.shutdown()


def test_higher_priority_waits_less(trtllm_double):
    t = trtllm_double
    t.TEST_DOUBLE.iteration_ms = 5
    ex = _executor(t, max_batch_size=1)
    try:
        blocker = ex.enqueue_request(t.Request([9], 50, streaming=True))
        assert ex.await_responses(blocker, timeout=WAIT)  # running: the others must wait
        ids = [
            ex.enqueue_request(t.Request([i], 2, streaming=False, priority=p))
            for i, p in ((1, 0.5), (2, 0.5), (3, 0.9))
        ]
        ex.cancel_request(blocker)
        order = []
        while len(order) < 3:
            got = ex.await_responses(timeout=WAIT)
            order += [r.request_id for r in got if r.request_id != blocker]
        assert order == [ids[2], ids[0], ids[1]]  # higher first, then FIFO
    finally:
        ex.shutdown()
