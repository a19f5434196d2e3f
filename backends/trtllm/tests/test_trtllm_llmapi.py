"""The trtllm engine's LLM API flavour against the TEST DOUBLE of `tensorrt_llm.LLM`
(tests/doubles/tensorrt_llm/llmapi; NOT TensorRT-LLM, no GPU): loading a Hugging Face
checkpoint, per-request SamplingParams, streaming and coalescing, finish reasons, log
probabilities, cancellation, stats, KV-cache events and guided decoding (rollout control:
test_rl_control_trtllm.py)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import TRTLLM_ENGINES, Collector

from tensorgate.executor.engine import EngineError
from tensorgate.executor.engines import load_engine
from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine
from tensorgate.executor.engines.trtllm_llmapi_config import LlmApiSettings
from tensorgate.executor.settings import EngineConfig, ExecutorSettings
from tensorgate.launcher.model_source import TRTLLM_EXECUTOR, TRTLLM_LLMAPI, trtllm_flavour
from tensorgate.launcher.trtllm_launch import TrtllmLaunchError, trtllm_command
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(60)

EOS = [2, 7]
PROMPT = [11, 12, 13]
HAS_GRAMMAR = "grammar" in pb.GenerateRequest.DESCRIPTOR.fields_by_name


@pytest.fixture
def ckpt(tmp_path):
    """A Hugging Face checkpoint's config files (the double loads no weights)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 1000,
                "max_position_embeddings": 512,
                "torch_dtype": "bfloat16",
            }
        )
    )
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    return d


@pytest.fixture
def start(llmapi_double, collector, ckpt):
    engines = []

    def start(settings=None, gpus=8) -> TrtllmLlmApiEngine:
        engine = TrtllmLlmApiEngine(ckpt, settings, gpu_count=lambda: gpus)
        llmapi_double.TEST_DOUBLE.requests.clear()  # the warm-up's
        engine.start(collector.emit)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.shutdown()


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


def run(engine, collector, *requests, timeout=30):
    engine.submit(list(requests))
    collector.wait_finished([r.id for r in requests], timeout=timeout)


def sent(double, i=-1):
    return double.TEST_DOUBLE.requests[i][1]


# -- loading -------------------------------------------------------------------------------------


def test_loads_a_checkpoint_with_the_llm_api(start, llmapi_double, ckpt):
    engine = start(LlmApiSettings(max_batch_size=16, kv_cache_free_gpu_memory_fraction=0.5))
    llm = llmapi_double.TEST_DOUBLE.llms[-1]
    assert llm.model == ckpt
    kw = llm.kwargs
    assert kw["max_seq_len"] == 512  # max_position_embeddings
    assert kw["max_batch_size"] == 16 and kw["max_num_tokens"] == 8192
    assert kw["enable_chunked_prefill"] is True and kw["enable_iter_perf_stats"] is True
    assert kw["kv_cache_config"].free_gpu_memory_fraction == 0.5
    assert "orchestrator_type" not in kw and "guided_decoding_backend" not in kw
    info = engine.info()
    assert info.engine == "trtllm" and info.dtype == "bfloat16" and info.device == "cuda"
    assert info.vocab_size == 1000 and info.eos_token_ids == EOS
    lim = info.limits
    # Chunked prefill: a prompt may fill the sequence but one token.
    assert (lim.max_batch_size, lim.max_input_tokens, lim.max_total_tokens) == (16, 511, 512)
    # From the warm-up's iteration stats (kvCacheStats).
    assert info.kv_capacity_tokens == 512 * 32
    f = info.features
    assert f.logprobs and f.seed and f.top_k and f.top_p and f.stop_token_ids
    assert not f.top_n_tokens and not f.typical_p and not f.guided_decoding


def test_limits_from_the_settings(start):
    lim = start(LlmApiSettings(max_total_tokens=300, max_input_tokens=100)).info().limits
    assert (lim.max_input_tokens, lim.max_total_tokens) == (100, 300)


def test_limits_that_cannot_be_met(llmapi_double, ckpt, tmp_path):
    with pytest.raises(EngineError, match="--max-input-tokens 600 is larger"):
        TrtllmLlmApiEngine(ckpt, LlmApiSettings(max_input_tokens=600))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text('{"vocab_size": 100}')
    with pytest.raises(EngineError, match="pass --max-total-tokens"):
        TrtllmLlmApiEngine(bare)
    with pytest.raises(EngineError, match="config"):
        TrtllmLlmApiEngine(tmp_path)


def test_missing_tensorrt_llm_names_the_image(monkeypatch, ckpt):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(EngineError, match=r"nvcr\.io/nvidia/tensorrt-llm/release"):
        TrtllmLlmApiEngine(ckpt)


def test_an_unloadable_model_is_an_engine_error(llmapi_double, ckpt):
    (ckpt / "config.json").write_text('{"vocab_size": 1000, "max_position_embeddings": 64}')
    llmapi_double.TEST_DOUBLE.fail_at = {0: 0}  # the warm-up's prompt
    with pytest.raises(EngineError, match="warm-up request failed"):
        TrtllmLlmApiEngine(ckpt, gpu_count=lambda: 1)
    assert llmapi_double.TEST_DOUBLE.llms[-1]._shut  # shut down, not left running


def test_tensor_and_pipeline_parallel_through_tensorrt_llm(start, llmapi_double, ckpt):
    engine = start(LlmApiSettings(tensor_parallel_size=2, pipeline_parallel_size=2))
    kw = llmapi_double.TEST_DOUBLE.llms[-1].kwargs
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"]) == (2, 2)
    assert engine.info().device == "cuda x4 (tp 2, pp 2)"
    with pytest.raises(EngineError, match="needs 4 GPU"):
        TrtllmLlmApiEngine(ckpt, LlmApiSettings(tensor_parallel_size=4), gpu_count=lambda: 2)


def test_the_model_directory_picks_the_flavour(llmapi_double, ckpt, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert trtllm_flavour(ckpt) == TRTLLM_LLMAPI
    assert trtllm_flavour(TRTLLM_ENGINES / "llama-tp1-bf16") == TRTLLM_EXECUTOR
    settings = ExecutorSettings(max_total_tokens=128, tensor_parallel_size=1)
    engine = load_engine(EngineConfig("trtllm", model_dir=ckpt, settings=settings))
    try:
        assert isinstance(engine, TrtllmLlmApiEngine)
        assert engine.info().limits.max_total_tokens == 128
    finally:
        engine.shutdown()


def test_the_launcher_starts_one_process_for_a_checkpoint(ckpt):
    args = ["--engine", "trtllm", "--model-id", str(ckpt), "--tensor-parallel-size", "2"]
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "OMPI_COMM_WORLD_RANK": "3", "PATH": "/bin"}
    cmd = trtllm_command(args, env=env)
    assert cmd.argv[1:4] == ["-u", "-m", "tensorgate.executor"]  # no mpirun: TRT-LLM spawns
    assert cmd.world_size == 2
    assert "OMPI_COMM_WORLD_RANK" not in cmd.env
    with pytest.raises(TrtllmLaunchError, match="needs 2 GPU"):
        trtllm_command(args, env={"CUDA_VISIBLE_DEVICES": "0"})


# -- requests ----------------------------------------------------------------------------------


def test_streams_tokens_and_coalesces_steps(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.iteration_ms = 5
    engine = start()
    requests = [req(i, n=20, prompt=[i, 5, 6]) for i in range(1, 9)]
    run(engine, collector, *requests)
    assert all(len(collector.tokens[i]) == 20 for i in range(1, 9))
    assert all(collector.finish[i] == pb.FINISH_REASON_LENGTH for i in range(1, 9))
    assert collector.batches <= 40  # ~20 steps, not 160 tokens
    s = engine.stats()
    assert s.requests_finished == 8 and s.tokens_generated == 160 and s.iterations > 0
    (prompt, sp) = llmapi_double.TEST_DOUBLE.requests[0]
    assert prompt == [1, 5, 6] and sp.max_tokens == 20 and sp.detokenize is False


def test_sampling_params_per_request(start, collector, llmapi_double):
    engine = start()
    sampled = pb.SamplingParams(
        do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=1234,
        repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.25,
    )  # fmt: skip
    plain = req(3, sampling=pb.SamplingParams(do_sample=True))
    run(engine, collector, req(1, sampling=sampled), req(2))
    run(engine, collector, plain)
    s1, s2, s3 = (sent(llmapi_double, i) for i in range(3))
    assert (s1.temperature, s1.top_k, s1.seed) == (pytest.approx(0.7), 40, 1234)
    assert s1.top_p == pytest.approx(0.9)
    assert s1.repetition_penalty == pytest.approx(1.1)
    assert (s1.frequency_penalty, s1.presence_penalty) == (0.5, 0.25)
    assert (s2.top_k, s2.temperature, s2.seed) == (1, None, None)  # greedy
    # Sampling without top_k/top_p keeps top_p=1.0: SamplingParams counts it greedy otherwise.
    assert (s3.top_k, s3.top_p, s3.temperature) == (None, 1.0, 1.0)
    assert s2.end_id == EOS[0] and s2.stop_token_ids == [EOS[1]]
    assert s2.include_stop_str_in_output is True


def test_unsupported_parameters_are_errors(start, collector):
    engine = start()
    typical = req(1, sampling=pb.SamplingParams(do_sample=True, typical_p=0.5))
    top_n = req(2)
    top_n.top_n_tokens = 1
    run(engine, collector, typical, top_n, req(3, prompt=list(range(600))), req(4, n=0))
    assert all(collector.finish[i] == pb.FINISH_REASON_ERROR for i in (1, 2, 3, 4))
    assert "typical_p" in collector.errors[1]
    assert "max_input_tokens is 511" in collector.errors[3]


def test_eos_adds_no_token_the_engine_did_not_return(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.token_fn = lambda ids, step: EOS[0] if step == 2 else 500 + step
    engine = start()
    run(engine, collector, req(1, n=10, logprobs=True))
    assert collector.tokens[1] == [500, 501]
    assert len(collector.logprobs[1]) == 2
    assert collector.finish[1] == pb.FINISH_REASON_EOS_TOKEN


def test_an_end_token_tensorrt_llm_returns_is_reported_with_its_logprob(
    start, collector, llmapi_double
):
    llmapi_double.TEST_DOUBLE.end_token_returned = True
    llmapi_double.TEST_DOUBLE.token_fn = lambda ids, step: EOS[0] if step == 2 else 500 + step
    engine = start()
    run(engine, collector, req(1, n=10, logprobs=True))
    assert collector.tokens[1] == [500, 501, EOS[0]]
    assert len(collector.logprobs[1]) == 3
    assert collector.finish[1] == pb.FINISH_REASON_EOS_TOKEN


def test_stop_token_and_second_eos_id(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.token_fn = lambda ids, step: {
        (1, 2): 702,
        (2, 1): EOS[1],
    }.get((ids[0], step), 800 + step)
    engine = start()
    run(engine, collector, req(1, n=10, prompt=[1, 5], stop=[702]), req(2, n=10, prompt=[2, 5]))
    assert collector.tokens[1] == [800, 801, 702]  # the stop token is kept
    assert collector.finish[1] == pb.FINISH_REASON_STOP_TOKEN
    assert collector.tokens[2] == [800, EOS[1]]
    assert collector.finish[2] == pb.FINISH_REASON_EOS_TOKEN


def test_ignore_eos(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.token_fn = lambda ids, step: EOS[0]
    engine = start()
    run(engine, collector, req(1, n=4, ignore_eos=True))
    assert collector.tokens[1] == [EOS[0]] * 4
    sp = sent(llmapi_double)
    assert sp.ignore_eos is True and not sp.stop_token_ids


def test_logprobs_read_once_at_their_positions(start, collector, llmapi_double):
    engine = start()
    run(engine, collector, req(1, n=7, logprobs=True), req(2, n=3))
    assert collector.logprobs[1] == [pytest.approx(-0.5 - 0.01 * (i % 5)) for i in range(7)]
    assert collector.logprobs[2] == []
    assert sent(llmapi_double, 0).logprobs == 1 and not sent(llmapi_double, 1).logprobs


def test_min_tokens_and_logit_bias(start, collector, llmapi_double):
    if "min_new_tokens" not in pb.GenerateRequest.DESCRIPTOR.fields_by_name:
        pytest.skip("this contract has no min_new_tokens/logit_bias yet")
    engine = start()
    r = req(1, n=5)
    r.min_new_tokens = 3
    r.logit_bias[42] = -5.0
    run(engine, collector, r)
    sp = sent(llmapi_double)
    assert sp.min_tokens == 3
    assert sp.embedding_bias.shape == (1000,) and float(sp.embedding_bias[42]) == -5.0
    bad = req(2)
    bad.logit_bias[5000] = 1.0
    run(engine, collector, bad)
    assert "outside the vocabulary" in collector.errors[2]


def test_cancel(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.iteration_ms = 5
    engine = start()
    engine.submit([req(1, n=400)])
    collector.wait_tokens(1, 2)
    engine.cancel([1, 999])
    collector.wait_finished([1])
    assert collector.finish[1] == pb.FINISH_REASON_CANCELLED
    n = len(collector.tokens[1])
    time.sleep(0.1)
    assert len(collector.tokens[1]) == n and n < 400
    assert engine.stats().requests_cancelled == 1
    assert not llmapi_double.TEST_DOUBLE.llms[-1]._active  # abort() reached TensorRT-LLM


def test_an_executor_error_fails_only_its_request(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.fail_at = {77: 2}
    engine = start()
    run(engine, collector, req(1, n=10, prompt=[77, 1]), req(2, n=5, prompt=[78, 1]))
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "simulated failure" in collector.errors[1]
    assert len(collector.tokens[1]) == 2
    assert collector.finish[2] == pb.FINISH_REASON_LENGTH


def test_stats_queue_paused_and_kv(start, collector, llmapi_double):
    llmapi_double.TEST_DOUBLE.iteration_ms = 5
    llmapi_double.TEST_DOUBLE.paused_requests = 1
    engine = start(LlmApiSettings(max_batch_size=2))
    engine.submit([req(i, n=300, prompt=[i, 2]) for i in range(1, 5)])
    collector.wait_tokens(1, 3)
    deadline = time.monotonic() + 5
    while engine.scheduling() != (1, 1, 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduling() == (1, 1, 2)
    s = engine.stats()
    assert s.queued_requests == 2 and s.active_requests == 2
    assert s.kv_block_size == 32 and s.kv_blocks_used > 0
    assert s.kv_blocks_used + s.kv_blocks_free == 512
    engine.cancel([1, 2, 3, 4])
    collector.wait_finished([1, 2, 3, 4])


def test_kv_cache_events_are_collected_for_routing(start, collector, llmapi_double):
    engine = start(LlmApiSettings(kv_event_buffer_size=64))
    kv = llmapi_double.TEST_DOUBLE.llms[-1].kwargs["kv_cache_config"]
    assert kv.event_buffer_max_size == 64 and kv.enable_block_reuse
    run(engine, collector, req(1, n=2, prompt=list(range(1, 70))))
    deadline = time.monotonic() + 5
    events: list[dict] = []
    while len(events) < 2 and time.monotonic() < deadline:
        events += engine.kv_cache_events()
        time.sleep(0.05)
    stored, removed = events[0]["data"], events[-1]["data"]
    assert stored["type"] == "stored" and len(stored["blocks"]) == 2  # 69 tokens, 32 per block
    assert [t["token_id"] for t in stored["blocks"][0]["tokens"]] == list(range(1, 33))
    assert removed["type"] == "removed"
    assert removed["block_hashes"] == [b["block_hash"] for b in stored["blocks"]]
    assert engine.kv_cache_events() == []  # drained


def test_no_kv_events_unless_asked(start, collector):
    engine = start()
    run(engine, collector, req(1, n=2, prompt=list(range(1, 70))))
    assert engine.kv_cache_events() == []
    assert engine.kv_cache_event_batch() is None  # the RPC answers UNIMPLEMENTED


def test_kv_cache_events_reach_the_contract(start, collector):
    engine = start(LlmApiSettings(kv_event_buffer_size=64))
    run(engine, collector, req(1, n=2, prompt=list(range(1, 70))))
    deadline = time.monotonic() + 5
    events = []
    while len(events) < 2 and time.monotonic() < deadline:
        events += engine.kv_cache_event_batch().events
        time.sleep(0.05)
    stored, removed = events[0], events[-1]
    assert stored.WhichOneof("kind") == "stored" and len(stored.stored.blocks) == 2
    assert list(stored.stored.blocks[0].token_ids) == list(range(1, 33))
    assert removed.WhichOneof("kind") == "removed"
    assert list(removed.removed.block_hashes) == [b.block_hash for b in stored.stored.blocks]
    assert stored.event_id < removed.event_id


@pytest.mark.skipif(not HAS_GRAMMAR, reason="this contract carries no grammar yet")
def test_guided_decoding_behind_its_backend(start, collector, llmapi_double):
    def with_grammar(rid, kind, text):
        r = req(rid)
        r.grammar.kind = kind
        r.grammar.value = text
        return r

    schema = '{"type": "object"}'
    engine = start()
    assert not engine.info().features.guided_decoding
    run(engine, collector, with_grammar(1, pb.GRAMMAR_KIND_JSON_SCHEMA, schema))
    assert "--guided-decoding-backend" in collector.errors[1]
    engine = start(LlmApiSettings(guided_decoding_backend="xgrammar"))
    assert engine.info().features.guided_decoding
    assert llmapi_double.TEST_DOUBLE.llms[-1].kwargs["guided_decoding_backend"] == "xgrammar"
    run(
        engine,
        collector,
        with_grammar(2, pb.GRAMMAR_KIND_JSON_SCHEMA, schema),
        with_grammar(3, pb.GRAMMAR_KIND_REGEX, "[a-z]+"),
        with_grammar(4, pb.GRAMMAR_KIND_LARK, 'start: "a"'),
    )
    g2, g3 = sent(llmapi_double, 0).guided_decoding, sent(llmapi_double, 1).guided_decoding
    assert g2.json == schema and g3.regex == "[a-z]+"
    assert "not supported by TensorRT-LLM's xgrammar backend" in collector.errors[4]
    engine = start(LlmApiSettings(guided_decoding_backend="llguidance"))
    run(engine, collector, with_grammar(5, pb.GRAMMAR_KIND_LARK, 'start: "a"'))
    assert sent(llmapi_double).guided_decoding.grammar == 'start: "a"'


def test_shutdown_ends_live_requests(llmapi_double, ckpt):
    collector = Collector()
    engine = TrtllmLlmApiEngine(ckpt, gpu_count=lambda: 1)
    engine.start(collector.emit)
    engine.submit([req(1, n=400), req(2, n=400)])
    collector.wait_tokens(1, 1)
    engine.shutdown()
    assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_ERROR
    assert "shutting down" in collector.errors[1]
    assert llmapi_double.TEST_DOUBLE.llms[-1]._shut
    assert engine.health()[0] is False
    engine.submit([req(3)])
    assert collector.finish[3] == pb.FINISH_REASON_ERROR
    engine.shutdown()


def test_settings_of_the_other_flavour_are_named_as_ignored(
    llmapi_double, trtllm_double, ckpt, monkeypatch, caplog
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    settings = ExecutorSettings(
        capacity_scheduler_policy="max_utilization", tensor_parallel_size=1, rl_hooks=False
    )
    engine = load_engine(EngineConfig("trtllm", model_dir=ckpt, settings=settings))
    engine.shutdown()
    assert "--capacity-scheduler-policy only apply to an engine directory" in caplog.text
    caplog.clear()
    settings = ExecutorSettings(kv_event_buffer_size=8, guided_decoding_backend="xgrammar")
    engine = load_engine(
        EngineConfig("trtllm", model_dir=TRTLLM_ENGINES / "llama-tp1-bf16", settings=settings)
    )
    engine.shutdown()
    assert "--kv-event-buffer-size, --guided-decoding-backend only apply to a Hugging" in (
        caplog.text
    )


def test_stats_given_as_json_text_are_read_too(llmapi_double, ckpt, monkeypatch):
    real = llmapi_double.LLM.get_stats
    monkeypatch.setattr(
        llmapi_double.LLM,
        "get_stats",
        lambda self, timeout=2: [json.dumps(s) for s in real(self, timeout)],
    )
    engine = TrtllmLlmApiEngine(ckpt, gpu_count=lambda: 1)
    try:
        assert engine.info().kv_capacity_tokens == 512 * 32
    finally:
        engine.shutdown()
