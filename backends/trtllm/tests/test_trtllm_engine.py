"""The trtllm engine against the TEST DOUBLE of `tensorrt_llm.bindings.executor`
(tests/doubles; NOT TensorRT-LLM, no GPU): request mapping, streaming, coalescing, finish
reasons, cancellation, errors, stats, shutdown, and the message when TensorRT-LLM is missing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import TRTLLM_ENGINES, Collector, make_trtllm_engine_dir

from tensorgate.executor.engine import EngineError, EngineFeatures
from tensorgate.executor.engines import load_engine
from tensorgate.executor.engines.trtllm_engine import TrtllmEngine, TrtllmSettings
from tensorgate.executor.settings import EngineConfig, ExecutorSettings
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(120)

TP1 = TRTLLM_ENGINES / "llama-tp1-bf16"
EOS = [128001, 128008, 128009]  # llama-tp1-bf16/generation_config.json
PROMPT = [128000, 9906, 1917]


def req(rid, n=4, prompt=PROMPT, sampling=None, stop=(), ignore_eos=False, logprobs=False):
    return pb.GenerateRequest(
        id=rid,
        input_ids=list(prompt),
        max_new_tokens=n,
        sampling=sampling or pb.SamplingParams(),
        stop_token_ids=list(stop),
        ignore_eos=ignore_eos,
        return_logprobs=logprobs,
    )


@pytest.fixture
def start(trtllm_double, collector):
    engines = []

    def start(engine_dir=TP1, settings=None, **kw) -> TrtllmEngine:
        engine = TrtllmEngine(engine_dir, settings, gpu_count=lambda: 8, **kw)
        # The load's warm-up request (test_warm_up_...) is not the tests' business below.
        trtllm_double.TEST_DOUBLE.requests.clear()
        engine.start(collector.emit)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.shutdown()


def run(engine, collector, *requests, timeout=30):
    engine.submit(list(requests))
    collector.wait_finished([r.id for r in requests], timeout=timeout)


# -- loading -------------------------------------------------------------------------------------


def test_missing_tensorrt_llm_names_the_image(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # `import tensorrt_llm` fails
    with pytest.raises(EngineError) as e:
        load_engine(EngineConfig("trtllm", model_dir=TP1))
    msg = str(e.value)
    assert "nvcr.io/nvidia/tensorrt-llm/release" in msg
    assert "Dockerfile_trtllm" in msg
    assert "not installed" in msg


def test_executor_process_without_tensorrt_llm_exits_with_the_message(tmp_path):
    """The real entry point, in a subprocess with no tensorrt_llm: one clear line, no
    traceback, exit code 1."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    probe = subprocess.run(
        [sys.executable, "-c", "import tensorrt_llm"], env=env, capture_output=True
    )
    if probe.returncode == 0:
        pytest.skip("a real tensorrt_llm is installed here")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorgate.executor",
            "--engine",
            "trtllm",
            "--model-id",
            str(TP1),
            "--uds-path",
            str(tmp_path / "x.sock"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "nvcr.io/nvidia/tensorrt-llm/release" in proc.stderr
    assert "Dockerfile_trtllm" in proc.stderr


def test_bad_engine_dir_fails_before_tensorrt_llm_is_needed(tmp_path):
    with pytest.raises(EngineError, match=r"config\.json does not exist"):
        TrtllmEngine(tmp_path)


def test_executor_config_passed_to_tensorrt_llm(start, trtllm_double):
    t = trtllm_double
    start(
        settings=TrtllmSettings(
            max_batch_size=16,
            kv_cache_free_gpu_memory_fraction=0.5,
            enable_kv_block_reuse=False,
            capacity_scheduler_policy="max_utilization",
        )
    )
    ex = t.TEST_DOUBLE.executors[-1]
    assert ex.model_path == TP1
    c = ex.config
    assert c.max_beam_width == 1
    # max_utilization streams only with chunked context (executorImpl.cpp fetchNewRequests).
    assert c.enable_chunked_context is True
    assert c.max_batch_size == 16
    assert c.kv_cache_config.free_gpu_memory_fraction == 0.5
    assert c.kv_cache_config.enable_block_reuse is False
    assert c.scheduler_config.capacity_scheduler_policy == t.CapacitySchedulerPolicy.MAX_UTILIZATION


def test_defaults_keep_the_engine_batch_size(start, trtllm_double):
    start()
    c = trtllm_double.TEST_DOUBLE.executors[-1].config
    assert c.max_batch_size is None  # the engine's own
    assert c.kv_cache_config.free_gpu_memory_fraction == 0.9
    assert c.kv_cache_config.enable_block_reuse is True
    assert (
        c.scheduler_config.capacity_scheduler_policy
        == trtllm_double.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    )


def test_invalid_settings(trtllm_double):
    with pytest.raises(EngineError, match=r"free-gpu-memory-fraction must be in \(0, 1\]"):
        TrtllmEngine(TP1, TrtllmSettings(kv_cache_free_gpu_memory_fraction=1.5))
    with pytest.raises(EngineError, match="--capacity-scheduler-policy must be one of"):
        TrtllmEngine(TP1, TrtllmSettings(capacity_scheduler_policy="fifo"))


def test_executor_that_cannot_load_is_an_engine_error(trtllm_double):
    trtllm_double.TEST_DOUBLE.constructor_error = "[TensorRT-LLM][ERROR] engine plan mismatch"
    with pytest.raises(EngineError, match=r"could not load the engine.*plan mismatch"):
        TrtllmEngine(TP1, gpu_count=lambda: 1)


def test_engine_needs_its_gpus(trtllm_double):
    with pytest.raises(EngineError, match="world_size 2"):
        TrtllmEngine(TRTLLM_ENGINES / "llama-tp2", gpu_count=lambda: 1)


def test_from_config_passes_the_settings_with_their_defaults(trtllm_double, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    config = EngineConfig("trtllm", model_dir=TP1, settings=ExecutorSettings(max_total_tokens=2048))
    engine = load_engine(config)
    try:
        assert isinstance(engine, TrtllmEngine)
        assert engine.limits.max_total_tokens == 2048
        cfg = trtllm_double.TEST_DOUBLE.executors[-1].config
        assert cfg.kv_cache_config.free_gpu_memory_fraction == 0.9
        assert cfg.kv_cache_config.enable_block_reuse is True
        settings = ExecutorSettings(
            kv_cache_free_gpu_memory_fraction=0.3, enable_kv_block_reuse=False
        )
        engine2 = load_engine(dataclasses.replace(config, settings=settings))
        cfg2 = trtllm_double.TEST_DOUBLE.executors[-1].config
        assert cfg2.kv_cache_config.free_gpu_memory_fraction == 0.3
        assert cfg2.kv_cache_config.enable_block_reuse is False
        engine2.shutdown()
    finally:
        engine.shutdown()


def test_non_leader_rank_serves_nothing_and_exits(trtllm_double, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    trtllm_double.TEST_DOUBLE.can_enqueue = False  # an MPI rank other than 0
    with pytest.raises(SystemExit) as e:
        load_engine(EngineConfig("trtllm", model_dir=TP1))
    assert e.value.code == 0
    assert trtllm_double.TEST_DOUBLE.executors[-1].shutdown_called
    assert trtllm_double.TEST_DOUBLE.requests == []  # only the leader enqueues, warm-up too


# -- info --------------------------------------------------------------------------------------


def test_info_from_the_engine_config(start):
    engine = start()
    info = engine.info()
    assert info.engine == "trtllm"
    assert info.dtype == "bfloat16"
    assert info.device == "cuda"
    assert info.vocab_size == 128256
    assert info.eos_token_ids == EOS
    lim = info.limits
    # Chunked context is on (the engine has paged context FMHA): the prompt limit is
    # max_seq_len - 1, the executor's own, not build_config.max_input_len.
    assert (lim.max_batch_size, lim.max_input_tokens, lim.max_total_tokens) == (64, 8191, 8192)
    assert (lim.max_num_tokens, lim.max_top_n_tokens) == (8192, 0)
    f = info.features
    assert f.logprobs and f.seed and f.top_k and f.top_p and f.stop_token_ids
    assert f.repetition_penalty and f.frequency_penalty and f.presence_penalty
    assert not f.typical_p and not f.top_n_tokens and not f.guided_decoding
    assert info.to_proto("test").limits.max_total_tokens == 8192


def test_info_fp8_and_tp2(start, tmp_path):
    assert start(TRTLLM_ENGINES / "llama-fp8").info().dtype == "fp8"
    info = start(TRTLLM_ENGINES / "llama-tp2").info()
    assert info.device == "cuda x2 (tp 2, pp 1)"
    assert info.eos_token_ids == []  # no generation_config.json and no tokenizer dir
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "generation_config.json").write_text('{"eos_token_id": 2, "pad_token_id": 0}')
    engine = start(TRTLLM_ENGINES / "llama-tp2", TrtllmSettings(tokenizer_dir=tok))
    assert engine.info().eos_token_ids == [2]
    assert engine.pad_id == 0


def test_warm_up_learns_the_kv_capacity_before_serving(trtllm_double):
    # TensorRT-LLM reports its KV cache only in iteration stats: the load runs one iteration.
    engine = TrtllmEngine(TP1, gpu_count=lambda: 1)
    try:
        ex = trtllm_double.TEST_DOUBLE.executors[-1]
        assert engine.info().kv_capacity_tokens == ex.max_num_blocks * ex.tokens_per_block > 0
        (warm,) = trtllm_double.TEST_DOUBLE.requests
        assert warm.max_tokens == 1 and not warm.streaming
        s = engine.stats()  # a load-time request is not a served one
        assert s.requests_received == s.requests_finished == s.tokens_generated == 0
        assert s.kv_blocks_used == 0 and s.kv_blocks_free == ex.max_num_blocks
    finally:
        engine.shutdown()


def test_a_failing_warm_up_fails_the_load(trtllm_double):
    trtllm_double.TEST_DOUBLE.fail_at = {0: 0}  # the warm-up's prompt is token 0
    with pytest.raises(EngineError, match="warm-up request failed in TensorRT-LLM: test double"):
        TrtllmEngine(TP1, gpu_count=lambda: 1)
    assert trtllm_double.TEST_DOUBLE.executors[-1].shutdown_called


def test_a_warm_up_that_never_ends_fails_the_load(trtllm_double, monkeypatch):
    monkeypatch.setattr("tensorgate.executor.engines.trtllm_engine.WARMUP_TIMEOUT_S", 0.3)
    # A response that never comes: await_responses times out, again and again.
    monkeypatch.setattr(
        trtllm_double.Executor, "await_responses", lambda self, *a, **k: time.sleep(0.02) or []
    )
    with pytest.raises(EngineError, match="did not finish in 0 s"):
        TrtllmEngine(TP1, gpu_count=lambda: 1)
    assert trtllm_double.TEST_DOUBLE.executors[-1].shutdown_called


# -- requests ----------------------------------------------------------------------------------


def test_streams_tokens_with_server_ids(start, collector, trtllm_double):
    engine = start()
    run(engine, collector, req(1000, n=5), req(2000, n=3))
    assert len(collector.tokens[1000]) == 5
    assert len(collector.tokens[2000]) == 3
    assert collector.finish[1000] == collector.finish[2000] == pb.FINISH_REASON_LENGTH
    # TensorRT-LLM numbered them 1 and 2; the outputs carry the server's ids only.
    assert set(collector.finish) == {1000, 2000}
    sent = trtllm_double.TEST_DOUBLE.requests
    assert [list(r.input_token_ids) for r in sent] == [PROMPT, PROMPT]
    assert all(r.streaming and r.max_tokens in (5, 3) for r in sent)


def test_one_message_per_iteration_not_per_token(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.iteration_ms = 5
    engine = start()
    requests = [req(i, n=20, prompt=[i, 5, 6]) for i in range(1, 9)]
    run(engine, collector, *requests)
    tokens = sum(len(collector.tokens[i]) for i in range(1, 9))
    assert tokens == 160
    # 8 requests advance together: ~20 messages (a few more if a wake-up splits a step).
    assert collector.batches <= 40


def test_responses_arriving_together_are_one_output_per_request(trtllm_double, collector):
    engine = TrtllmEngine(TP1, gpu_count=lambda: 1)
    # Hold the consumer back so that several iterations pile up, then let it read them all.
    executor = engine._executor
    real = executor.await_responses
    gate = {"open": False}

    def slow(*a, **k):
        if not gate["open"]:
            time.sleep(0.01)
            return []
        return real(*a, **k)

    executor.await_responses = slow
    engine.start(collector.emit)
    try:
        engine.submit([req(1, n=6), req(2, n=6)])
        time.sleep(0.3)  # the double finishes both meanwhile
        gate["open"] = True
        collector.wait_finished([1, 2])
        assert collector.batches == 1
        assert len(collector.tokens[1]) == len(collector.tokens[2]) == 6
        assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_LENGTH
    finally:
        engine.shutdown()


def test_sampling_parameters_reach_the_sampling_config(start, collector, trtllm_double):
    engine = start()
    sampled = pb.SamplingParams(
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        seed=1234,
        repetition_penalty=1.1,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    run(
        engine,
        collector,
        req(1, sampling=sampled),
        req(2),
        req(3, sampling=pb.SamplingParams(do_sample=True)),
    )
    by_prompt = trtllm_double.TEST_DOUBLE.requests
    s1, s2, s3 = (r.sampling_config for r in by_prompt)
    assert s1.beam_width == 1
    assert (s1.temperature, s1.top_k, s1.seed) == (pytest.approx(0.7), 40, 1234)
    assert s1.top_p == pytest.approx(0.9)
    assert s1.repetition_penalty == pytest.approx(1.1)
    assert s1.frequency_penalty == pytest.approx(0.5)
    assert s1.presence_penalty == pytest.approx(0.25)
    # Greedy: top_k 1, nothing else.
    assert (s2.top_k, s2.temperature, s2.seed, s2.repetition_penalty) == (1, None, None, None)
    # Plain sampling keeps top_p=1.0 so that TensorRT-LLM does not fall back to greedy.
    assert (s3.top_k, s3.top_p, s3.temperature) == (None, 1.0, 1.0)


def test_unsupported_parameters_are_errors(start, collector):
    engine = start()
    typical = req(1, sampling=pb.SamplingParams(do_sample=True, typical_p=0.5))
    top_n = req(2)
    top_n.top_n_tokens = 2
    run(engine, collector, typical, top_n)
    assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_ERROR
    assert "typical_p" in collector.errors[1]
    assert "max_top_n_tokens is 0" in collector.errors[2]


def test_eos_ends_without_a_token_the_engine_did_not_return(start, collector, trtllm_double):
    # The double's model picks the end id at step 3; TensorRT-LLM does not return the end
    # token, nor a log probability for it. Nothing is added in its place: the finish reason
    # says eos, and no value TensorRT-LLM did not produce is reported.
    trtllm_double.TEST_DOUBLE.token_fn = lambda ids, step: EOS[0] if step == 3 else 500 + step
    engine = start()
    run(engine, collector, req(1, n=10), req(2, n=10, prompt=[7, 8], logprobs=True))
    assert collector.tokens[1] == [500, 501, 502]
    assert collector.finish[1] == pb.FINISH_REASON_EOS_TOKEN
    assert collector.tokens[2] == [500, 501, 502]
    assert collector.logprobs[2] == [pytest.approx(trtllm_double._logprob(i)) for i in range(3)]
    assert collector.finish[2] == pb.FINISH_REASON_EOS_TOKEN
    assert engine.stats().tokens_generated == 6
    sent = trtllm_double.TEST_DOUBLE.requests[0]
    assert sent.end_id == EOS[0]
    # The other eos ids end generation as one-token stop words.
    assert sorted(sent.stop_words) == [[EOS[1]], [EOS[2]]]
    assert sent.pad_id == EOS[0]


def test_second_eos_id_is_an_eos_finish(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.token_fn = lambda ids, step: EOS[2] if step == 2 else 600 + step
    engine = start()
    run(engine, collector, req(1, n=10))
    assert collector.tokens[1] == [600, 601, EOS[2]]
    assert collector.finish[1] == pb.FINISH_REASON_EOS_TOKEN


def test_stop_token_ends_with_the_stop_token(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.token_fn = lambda ids, step: 700 + step
    engine = start()
    run(engine, collector, req(1, n=10, stop=[702]))
    assert collector.tokens[1] == [700, 701, 702]
    assert collector.finish[1] == pb.FINISH_REASON_STOP_TOKEN


def test_ignore_eos_disables_the_end_id(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.token_fn = lambda ids, step: EOS[0]
    engine = start()
    run(engine, collector, req(1, n=4, ignore_eos=True))
    assert collector.tokens[1] == [EOS[0]] * 4
    assert collector.finish[1] == pb.FINISH_REASON_LENGTH
    sent = trtllm_double.TEST_DOUBLE.requests[-1]
    assert sent.end_id == -1
    assert sent.stop_words == []


def test_results_without_finish_reasons_are_inferred(start, collector, trtllm_double):
    """Early 0.x bindings had no Result.finish_reasons: the reason is inferred."""
    d = trtllm_double.TEST_DOUBLE
    d.legacy_results = True
    d.token_fn = lambda ids, step: {(1, 2): EOS[0], (2, 1): 702}.get((ids[0], step), 800 + step)
    engine = start()
    run(
        engine,
        collector,
        req(1, n=10, prompt=[1, 5]),
        req(2, n=10, prompt=[2, 5], stop=[702]),
        req(3, n=3, prompt=[3, 5]),
    )
    assert collector.tokens[1] == [800, 801]  # the end token is not returned
    assert collector.finish[1] == pb.FINISH_REASON_EOS_TOKEN
    assert collector.tokens[2] == [800, 702]
    assert collector.finish[2] == pb.FINISH_REASON_STOP_TOKEN
    assert collector.finish[3] == pb.FINISH_REASON_LENGTH


def test_logprobs_one_per_token(start, collector, trtllm_double):
    engine = start()
    run(engine, collector, req(1, n=9, logprobs=True), req(2, n=5))
    # Result.log_probs is cumulative in a streamed result: each token's value is read once,
    # at its own position (re-reading from the start would repeat the first ones).
    assert collector.logprobs[1] == [pytest.approx(trtllm_double._logprob(i)) for i in range(9)]
    assert collector.logprobs[2] == []
    sent = trtllm_double.TEST_DOUBLE.requests
    assert [r.output_config.return_log_probs for r in sent] == [True, False]


def test_timed_out_is_an_error_not_length(start, collector, trtllm_double):
    # TensorRT-LLM ends a request past its allotted time with TIMED_OUT. The contract has no
    # timeout reason, and `length` would tell the client it got all it asked for.
    trtllm_double.TEST_DOUBLE.time_out_at = {31: 2}
    engine = start()
    run(engine, collector, req(1, n=10, prompt=[31, 1]), req(2, n=3, prompt=[32, 1]))
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "TensorRT-LLM timed the request out" in collector.errors[1]
    assert len(collector.tokens[1]) == 2  # what it generated before is kept
    assert collector.finish[2] == pb.FINISH_REASON_LENGTH
    stats = engine.stats()
    assert stats.requests_failed == 1 and stats.requests_finished == 1


@pytest.mark.parametrize("left_out", [1, 99])
def test_missing_log_probs_fail_the_request_rather_than_being_invented(
    start, collector, trtllm_double, left_out
):
    trtllm_double.TEST_DOUBLE.short_log_probs = {41: left_out}
    engine = start()
    cancelled = []
    real_cancel = engine._executor.cancel_request
    engine._executor.cancel_request = lambda tid: cancelled.append(tid) or real_cancel(tid)
    run(
        engine,
        collector,
        req(1, n=50, prompt=[41, 1], logprobs=True),
        req(2, n=5, prompt=[42, 1], logprobs=True),
        req(3, n=5, prompt=[41, 2]),  # same prompt start, no logprobs asked: unaffected
    )
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "log probabilities for 1 token" in collector.errors[1]
    # No token is reported without the log probability that was asked for.
    assert collector.tokens[1] == [] and collector.logprobs[1] == []
    assert len(cancelled) == 1  # TensorRT-LLM stops generating for it
    assert len(collector.logprobs[2]) == len(collector.tokens[2]) == 5
    assert all(math.isfinite(lp) for lp in collector.logprobs[2])
    assert collector.finish[2] == collector.finish[3] == pb.FINISH_REASON_LENGTH
    assert engine.stats().requests_failed == 1


def test_requests_over_the_limits_are_errors(start, collector, trtllm_double):
    engine = start(settings=TrtllmSettings(max_total_tokens=64))
    run(
        engine,
        collector,
        req(1, prompt=list(range(1, 65))),
        req(2, n=62, prompt=[1, 2, 3]),
        req(3, prompt=[]),
        req(4, n=0),
    )
    assert all(collector.finish[i] == pb.FINISH_REASON_ERROR for i in (1, 2, 3, 4))
    assert "max_input_tokens is 63" in collector.errors[1]
    assert "max_total_tokens of 64" in collector.errors[2]
    assert "empty" in collector.errors[3]
    assert "max_new_tokens is 0" in collector.errors[4]
    assert trtllm_double.TEST_DOUBLE.requests == []  # none reached TensorRT-LLM
    assert engine.stats().requests_failed == 4


def test_request_refused_by_enqueue_fails_alone(start, collector):
    engine = start()
    executor = engine._executor
    real = executor.enqueue_requests

    def picky(requests):
        if any(r.input_token_ids[0] == 13 for r in requests):
            raise RuntimeError("[TensorRT-LLM][ERROR] refused")
        return real(requests)

    executor.enqueue_requests = picky
    run(engine, collector, req(1, prompt=[13, 1]), req(2, prompt=[14, 1]))
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "refused" in collector.errors[1]
    assert collector.finish[2] == pb.FINISH_REASON_LENGTH


def test_error_response_ends_the_request(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.fail_at = {77: 2}
    engine = start()
    run(engine, collector, req(1, n=10, prompt=[77, 1]), req(2, n=10, prompt=[78, 1]))
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert collector.errors[1] == trtllm_double.TEST_DOUBLE.fail_message
    assert len(collector.tokens[1]) == 2
    assert collector.finish[2] == pb.FINISH_REASON_LENGTH
    stats = engine.stats()
    assert stats.requests_failed == 1 and stats.requests_finished == 1


# -- cancellation ------------------------------------------------------------------------------


def test_cancel_mid_stream(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.iteration_ms = 5
    engine = start()
    engine.submit([req(1, n=5000)])
    collector.wait_tokens(1, 3)
    engine.cancel([1, 424242])  # the unknown id is ignored
    collector.wait_finished([1])
    assert collector.finish[1] == pb.FINISH_REASON_CANCELLED
    n = len(collector.tokens[1])
    time.sleep(0.1)
    assert len(collector.tokens[1]) == n  # nothing after the cancellation
    assert n < 5000
    assert engine.stats().requests_cancelled == 1
    # The executor was told, and its own CANCELLED response was absorbed.
    assert trtllm_double.TEST_DOUBLE.executors[-1].get_num_responses_ready() == 0
    engine.cancel([1])  # twice: ignored
    assert engine.stats().requests_cancelled == 1


def test_cancel_a_queued_request(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.iteration_ms = 5
    engine = start(settings=TrtllmSettings(max_batch_size=1))
    engine.submit([req(1, n=5000), req(2, n=5)])
    collector.wait_tokens(1, 2)
    engine.cancel([2])
    collector.wait_finished([2])
    assert collector.finish[2] == pb.FINISH_REASON_CANCELLED
    assert collector.tokens[2] == []
    engine.cancel([1])
    collector.wait_finished([1])


def test_cancel_after_finish_is_ignored(start, collector):
    engine = start()
    run(engine, collector, req(1, n=2))
    engine.cancel([1])
    assert collector.finish[1] == pb.FINISH_REASON_LENGTH
    assert engine.stats().requests_cancelled == 0


# -- stats, health, failure, shutdown ----------------------------------------------------------


def test_stats_from_iteration_stats(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.iteration_ms = 5
    engine = start(settings=TrtllmSettings(max_batch_size=2))
    engine.submit([req(i, n=400, prompt=[i, 2]) for i in range(1, 5)])
    collector.wait_tokens(1, 3)
    s = engine.stats()
    assert s.requests_received == 4
    assert s.active_requests == 2 and s.queued_requests == 2
    assert s.kv_block_size == 32
    ex = trtllm_double.TEST_DOUBLE.executors[-1]
    assert s.kv_blocks_used > 0
    assert s.kv_blocks_used + s.kv_blocks_free == ex.max_num_blocks
    assert s.last_iteration_ms >= 0
    engine.cancel([1, 2, 3, 4])
    collector.wait_finished([1, 2, 3, 4])
    s = engine.stats()
    assert s.active_requests == 0 and s.queued_requests == 0
    assert s.requests_cancelled == 4
    assert s.tokens_generated == sum(len(collector.tokens[i]) for i in range(1, 5))
    assert s.iterations > 0


def test_executor_failure_fails_live_requests_and_health(start, collector):
    engine = start()
    executor = engine._executor

    def broken(*a, **k):
        raise RuntimeError("[TensorRT-LLM][ERROR] CUDA error: an illegal memory access")

    engine.submit([req(1, n=8000)])
    collector.wait_tokens(1, 1)
    executor.await_responses = broken
    collector.wait_finished([1])
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "illegal memory access" in collector.errors[1]
    ok, reason = engine.health()
    assert not ok and "illegal memory access" in reason
    engine.submit([req(2)])
    collector.wait_finished([2])
    assert collector.finish[2] == pb.FINISH_REASON_ERROR


def test_shutdown_ends_live_requests(trtllm_double):
    collector = Collector()
    engine = TrtllmEngine(TP1, gpu_count=lambda: 1)
    engine.start(collector.emit)
    assert engine.health() == (True, "")
    engine.submit([req(1, n=8000), req(2, n=8000)])
    collector.wait_tokens(1, 1)
    engine.shutdown()
    assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_ERROR
    assert "shutting down" in collector.errors[1]
    assert trtllm_double.TEST_DOUBLE.executors[-1].shutdown_called
    assert engine.health()[0] is False
    engine.submit([req(3)])
    assert collector.finish[3] == pb.FINISH_REASON_ERROR
    engine.shutdown()  # twice: harmless


def test_tighter_batch_limit_is_passed_and_reported(start, tmp_path, trtllm_double):
    d = make_trtllm_engine_dir(tmp_path, max_batch_size=4)
    engine = start(d)
    assert engine.info().limits.max_batch_size == 4
    assert trtllm_double.TEST_DOUBLE.executors[-1].config.max_batch_size is None


# -- issue 14: the executor path as TensorRT-LLM's source defines it ---------------------------


def test_max_utilization_without_chunked_context_is_refused_at_load(trtllm_double, tmp_path):
    d = make_trtllm_engine_dir(tmp_path)
    data = json.loads((d / "config.json").read_text())
    data["build_config"]["plugin_config"]["use_paged_context_fmha"] = False
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match="max_utilization needs chunked context"):
        TrtllmEngine(d, TrtllmSettings(capacity_scheduler_policy="max_utilization"))
    # guaranteed_no_evict serves it, chunked context off, with the executor's prompt limit.
    engine = TrtllmEngine(d, gpu_count=lambda: 1)
    try:
        assert trtllm_double.TEST_DOUBLE.executors[-1].config.enable_chunked_context is False
        assert engine.info().limits.max_input_tokens == 8191  # min(8191, max_num_tokens 8192)
    finally:
        engine.shutdown()


def test_priority_is_passed_through(start, collector, trtllm_double):
    engine = start()
    high, low, default = req(1), req(2), req(3)
    high.priority, low.priority = 30, -80
    run(engine, collector, high, low, default)
    sent = [r.priority for r in trtllm_double.TEST_DOUBLE.requests]
    assert sent == [pytest.approx(0.8), pytest.approx(0.0), pytest.approx(0.5)]


def test_an_error_response_for_a_request_fails_it_alone(start, collector, tmp_path):
    # An eos id outside the vocabulary becomes end_id; TensorRT-LLM refuses it with an error
    # response as it schedules the request (LlmRequest::validate), not at enqueue.
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "generation_config.json").write_text('{"eos_token_id": 999999}')
    engine = start(settings=TrtllmSettings(tokenizer_dir=tok))
    run(engine, collector, req(1), req(2, ignore_eos=True))
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "EndId (999999) is not within acceptable range" in collector.errors[1]
    assert collector.finish[2] == pb.FINISH_REASON_LENGTH


def test_queued_and_paused_are_reported_apart(start, collector, trtllm_double):
    trtllm_double.TEST_DOUBLE.iteration_ms = 5
    trtllm_double.TEST_DOUBLE.paused_requests = 1  # InflightBatchingStats.num_paused_requests
    engine = start(settings=TrtllmSettings(max_batch_size=2))
    engine.submit([req(i, n=400, prompt=[i, 2]) for i in range(1, 5)])
    collector.wait_tokens(1, 3)
    running, paused, queued = engine.scheduling()
    assert (running, paused, queued) == (1, 1, 2)
    s = engine.stats()
    assert s.queued_requests == 2 and s.active_requests == 2  # paused ones are active
    engine.cancel([1, 2, 3, 4])
    collector.wait_finished([1, 2, 3, 4])


def test_stats_and_cancel_after_shutdown_do_not_raise(start, collector, trtllm_double):
    engine = start()
    engine.shutdown()
    # The executor now raises on these ("Shutdown called"): the engine must not.
    engine.cancel([1])
    s = engine.stats()
    assert s.active_requests == 0
    assert engine.scheduling() == (0, 0, 0)


@pytest.mark.skipif(
    "grammar" not in pb.GenerateRequest.DESCRIPTOR.fields_by_name
    or "min_new_tokens" not in {f.name for f in dataclasses.fields(EngineFeatures)},
    reason="this contract has no structured-output fields yet",
)
def test_structured_output_fields_on_an_engine_directory(start, collector, trtllm_double):
    engine = start()
    f = engine.info().features
    assert not f.guided_decoding and not f.logit_bias and f.min_new_tokens and f.ignore_eos
    grammar, bias, least = req(1), req(2), req(3)
    grammar.grammar.kind = pb.GRAMMAR_KIND_REGEX
    grammar.grammar.value = "[a-z]+"
    bias.logit_bias[5] = 1.0
    least.min_new_tokens = 2
    run(engine, collector, grammar, bias, least)
    assert "--guided-decoding-backend" in collector.errors[1]  # refused, not run unenforced
    assert "logit_bias is not supported" in collector.errors[2]
    assert collector.finish[3] == pb.FINISH_REASON_LENGTH
    assert trtllm_double.TEST_DOUBLE.requests[-1].sampling_config.min_tokens == 2
