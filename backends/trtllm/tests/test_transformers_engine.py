"""The transformers engine on a real (tiny, random) llama checkpoint, on CPU."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import EOS, Collector

from tensorgate.executor.engines.transformers_engine import TransformersEngine
from tensorgate.v1 import executor_pb2 as pb

PROMPT = [1, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def engine_and_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    engine = TransformersEngine(tiny_llama_dir, device="cpu", max_batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return engine, model


@pytest.fixture(scope="module")
def collector():
    # One engine for the module, so one collector; request ids are unique across tests.
    return Collector()


@pytest.fixture(scope="module")
def engine(engine_and_model, collector):
    eng, _ = engine_and_model
    eng.start(collector.emit)
    yield eng
    eng.shutdown()


def req(rid, n, sampling=None, ignore_eos=True, stop=(), prompt=PROMPT):
    return pb.GenerateRequest(
        id=rid,
        input_ids=prompt,
        max_new_tokens=n,
        sampling=sampling or pb.SamplingParams(),
        ignore_eos=ignore_eos,
        stop_token_ids=list(stop),
    )


def test_info_reports_model_limits(engine):
    info = engine.info()
    assert info.engine == "transformers"
    assert info.vocab_size == 128
    assert info.eos_token_ids == [EOS]
    assert info.limits.max_total_tokens == 256
    assert info.limits.max_input_tokens == 255
    assert info.limits.max_batch_size == 4
    assert info.features["seed"] and not info.features.get("logprobs", False)


def test_greedy_matches_generate(engine_and_model, engine, collector):
    _, model = engine_and_model
    engine.submit([req(101, 12)])
    collector.wait_finished([101])
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )
    assert collector.tokens[101] == ref[0, len(PROMPT) :].tolist()
    assert collector.finish[101] == pb.FINISH_REASON_LENGTH


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, collector):
    s = pb.SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    engine.submit([req(201, 10, s)])
    collector.wait_finished([201])
    # Same seed again, now sharing the batch with other requests.
    other = pb.SamplingParams(do_sample=True, temperature=1.0, seed=99)
    engine.submit([req(202, 10, other), req(203, 10, s), req(204, 10)])
    collector.wait_finished([202, 203, 204])
    assert collector.tokens[201] == collector.tokens[203]
    s2 = pb.SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=8)
    engine.submit([req(205, 10, s2)])
    collector.wait_finished([205])
    assert collector.tokens[205] != collector.tokens[201]


def test_top_k_one_is_greedy(engine, collector):
    s = pb.SamplingParams(do_sample=True, temperature=2.0, top_k=1, seed=3)
    engine.submit([req(301, 8, s), req(302, 8)])
    collector.wait_finished([301, 302])
    assert collector.tokens[301] == collector.tokens[302]


def test_stop_token_ends_generation(engine, collector):
    engine.submit([req(401, 12)])
    collector.wait_finished([401])
    greedy = collector.tokens[401]
    stop_at = greedy[3]
    engine.submit([req(402, 12, stop=[stop_at])])
    collector.wait_finished([402])
    first = greedy.index(stop_at)
    assert collector.tokens[402] == greedy[: first + 1]
    assert collector.finish[402] == pb.FINISH_REASON_STOP_TOKEN


def test_eos_ends_generation_unless_ignored(engine, collector):
    # With EOS as a stop of its own we can force it: make the model's eos the greedy token.
    engine.submit([req(501, 12)])
    collector.wait_finished([501])
    greedy = collector.tokens[501]
    eos_like = greedy[2]
    saved = engine.eos_ids
    engine.eos_ids = [eos_like]
    try:
        engine.submit([req(502, 12, ignore_eos=False), req(503, 12, ignore_eos=True)])
        collector.wait_finished([502, 503])
    finally:
        engine.eos_ids = saved
    assert collector.tokens[502][-1] == eos_like
    assert len(collector.tokens[502]) == greedy.index(eos_like) + 1
    assert collector.finish[502] == pb.FINISH_REASON_EOS_TOKEN
    assert collector.tokens[503] == greedy


def test_max_new_tokens_is_exact(engine, collector):
    engine.submit([req(601, 1), req(602, 7)])
    collector.wait_finished([601, 602])
    assert len(collector.tokens[601]) == 1
    assert len(collector.tokens[602]) == 7


def test_cancel_mid_stream(engine, collector):
    before = engine.stats().requests_cancelled
    engine.submit([req(701, 240)])
    collector.wait_tokens(701, 2)
    engine.cancel([701])
    collector.wait_finished([701])
    assert collector.finish[701] == pb.FINISH_REASON_CANCELLED
    assert len(collector.tokens[701]) < 240
    time.sleep(0.2)
    stats = engine.stats()
    assert stats.requests_cancelled == before + 1
    assert stats.active_requests == 0


def test_prompt_over_limit_is_an_error_output(engine, collector):
    engine.submit([req(801, 4, prompt=[1] * 300)])
    collector.wait_finished([801])
    assert collector.finish[801] == pb.FINISH_REASON_ERROR
    assert "max_input_tokens is 255" in collector.errors[801]


def test_outputs_are_coalesced(engine, collector):
    before = collector.batches
    engine.submit([req(900 + i, 16) for i in range(4)])
    collector.wait_finished([900 + i for i in range(4)])
    # Four requests of 16 tokens in a batch of 4: far fewer emits than 64 tokens.
    emits = collector.batches - before
    assert emits < 40, emits
