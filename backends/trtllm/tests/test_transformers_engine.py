"""The transformers engine on a real (tiny, random) llama checkpoint, on CPU."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import EOS, Collector

from tensorgate.executor.engines.transformers_engine import (
    TransformersEngine,
    TransformersSettings,
    _configure_attention,
)
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(300)

PROMPT = [1, 17, 42, 99, 3]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def collector():
    # One engine for the module, so one collector; request ids are unique across tests.
    return Collector()


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, collector):
    eng = TransformersEngine(
        tiny_llama_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=32)
    )
    eng.start(collector.emit)
    yield eng
    eng.shutdown()


def req(
    rid,
    n,
    sampling=None,
    ignore_eos=True,
    stop=(),
    prompt=PROMPT,
    logprobs=False,
    top_n=0,
    **fields,
):
    return pb.GenerateRequest(
        id=rid,
        input_ids=prompt,
        max_new_tokens=n,
        sampling=sampling or pb.SamplingParams(),
        ignore_eos=ignore_eos,
        stop_token_ids=list(stop),
        return_logprobs=logprobs,
        top_n_tokens=top_n,
        **fields,
    )


def run(engine, collector, *requests):
    engine.submit(list(requests))
    collector.wait_finished([r.id for r in requests])
    return [collector.tokens[r.id] for r in requests]


def position_logits(model, prompt, generated) -> torch.Tensor:
    """The model's logits for each generated position, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]


def test_info_reports_model_limits_and_truthful_features(engine):
    info = engine.info()
    assert info.engine == "transformers"
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.vocab_size == 128
    assert info.eos_token_ids == [EOS]
    assert info.limits.max_total_tokens == 256  # the model's max_position_embeddings
    assert info.limits.max_input_tokens == 255
    assert info.limits.max_batch_size == 4
    assert info.limits.max_top_n_tokens == 5
    # Default cache: a quarter of the context per batch slot, at least one full request.
    assert info.kv_capacity_tokens >= 256
    assert info.kv_capacity_tokens % 32 == 0
    f = info.features
    assert f.logprobs and f.top_n_tokens and f.seed and f.top_k and f.top_p and f.stop_token_ids
    assert f.typical_p and f.repetition_penalty and f.frequency_penalty and f.presence_penalty
    assert f.min_new_tokens and f.logit_bias and f.ignore_eos
    # The tiny checkpoint has no tokenizer, so no grammar can be enforced: not claimed.
    assert not f.guided_decoding


def test_greedy_matches_generate_and_is_deterministic(model, engine, collector):
    first, second = run(engine, collector, req(101, 12), req(102, 12))
    (third,) = run(engine, collector, req(103, 12))
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )
    assert first == ref[0, len(PROMPT) :].tolist()
    assert first == second == third
    assert collector.finish[101] == pb.FINISH_REASON_LENGTH


def test_greedy_logprobs_and_top_n_are_the_models(model, engine, collector):
    (tokens,) = run(engine, collector, req(151, 8, logprobs=True, top_n=3))
    logprobs = torch.log_softmax(position_logits(model, PROMPT, tokens), dim=-1)
    expected = logprobs.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    assert collector.logprobs[151] == pytest.approx(expected.tolist(), abs=1e-4)
    top = collector.top[151]
    assert len(top) == len(tokens)
    for i, t in enumerate(top):
        values, ids = torch.topk(logprobs[i], 3)
        assert list(t.ids) == ids.tolist()
        assert list(t.logprobs) == pytest.approx(values.tolist(), abs=1e-4)
        assert t.ids[0] == tokens[i]  # greedy: the chosen token is the top one


def test_logprobs_off_means_none_sent(engine, collector):
    run(engine, collector, req(161, 4))
    assert collector.logprobs[161] == [] and collector.top[161] == []


def test_missing_logprobs_fail_the_request_rather_than_being_invented(
    engine, collector, monkeypatch
):
    # The book of recorded logprobs comes back empty: no value may stand in for them.
    monkeypatch.setattr(engine.book, "take", lambda key, first, count: [None] * count)
    before = engine.stats()
    run(engine, collector, req(165, 40, logprobs=True), req(166, 4))
    assert collector.finish[165] == pb.FINISH_REASON_ERROR
    assert "no log probability for 1 of 1 token(s)" in collector.errors[165]
    assert collector.tokens[165] == [] and collector.logprobs[165] == []
    assert collector.finish[166] == pb.FINISH_REASON_LENGTH and len(collector.tokens[166]) == 4
    after = engine.stats()
    assert after.requests_failed == before.requests_failed + 1
    time.sleep(0.3)  # the manager was told to stop it: nothing more comes for it
    assert collector.tokens[165] == []
    assert engine.stats().active_requests == 0


def test_sampled_logprobs_are_of_the_warped_distribution(model, engine, collector):
    s = pb.SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=1.0, seed=11)
    (tokens,) = run(engine, collector, req(171, 10, s, logprobs=True, top_n=5))
    logits = position_logits(model, PROMPT, tokens) / 0.7
    kth = torch.topk(logits, 20, dim=-1).values[:, -1:]
    warped = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    expected = warped.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    assert collector.logprobs[171] == pytest.approx(expected.tolist(), abs=1e-4)
    # Every sampled token was inside the top-k.
    assert all(lp > float("-inf") for lp in collector.logprobs[171])
    assert all(len(t.ids) == 5 for t in collector.top[171])


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, collector):
    s = pb.SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    (alone,) = run(engine, collector, req(201, 10, s))
    # Same seed again, now sharing the batch with other requests.
    other = pb.SamplingParams(do_sample=True, temperature=1.0, seed=99)
    _, shared, _ = run(engine, collector, req(202, 10, other), req(203, 10, s), req(204, 10))
    assert alone == shared
    s8 = pb.SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=8)
    (other_seed,) = run(engine, collector, req(205, 10, s8))
    assert other_seed != alone


def test_unseeded_sampling_varies(engine, collector):
    s = pb.SamplingParams(do_sample=True, temperature=1.5)
    a, b = run(engine, collector, req(251, 12, s), req(252, 12, s))
    assert a != b


def test_top_k_one_is_greedy(engine, collector):
    s = pb.SamplingParams(do_sample=True, temperature=2.0, top_k=1, seed=3)
    sampled, greedy = run(engine, collector, req(301, 8, s), req(302, 8))
    assert sampled == greedy


def test_stop_token_ends_generation(engine, collector):
    (greedy,) = run(engine, collector, req(401, 12))
    stop_at = greedy[3]
    (stopped,) = run(engine, collector, req(402, 12, stop=[stop_at]))
    assert stopped == greedy[: greedy.index(stop_at) + 1]
    assert collector.finish[402] == pb.FINISH_REASON_STOP_TOKEN


def test_eos_ends_generation_unless_ignored(engine, collector):
    # The tiny model rarely emits its eos by chance: make one of its greedy tokens the eos.
    (greedy,) = run(engine, collector, req(501, 12))
    eos_like = greedy[2]
    saved = engine.eos_ids
    engine.eos_ids = [eos_like]
    try:
        stopped, ignored = run(
            engine, collector, req(502, 12, ignore_eos=False), req(503, 12, ignore_eos=True)
        )
    finally:
        engine.eos_ids = saved
    assert stopped == greedy[: greedy.index(eos_like) + 1]
    assert collector.finish[502] == pb.FINISH_REASON_EOS_TOKEN
    assert ignored == greedy
    assert collector.finish[503] == pb.FINISH_REASON_LENGTH


def test_max_new_tokens_is_exact(engine, collector):
    one, seven = run(engine, collector, req(601, 1), req(602, 7))
    assert len(one) == 1 and len(seven) == 7


def test_cancel_mid_stream(engine, collector):
    before = engine.stats().requests_cancelled
    engine.submit([req(701, 240)])
    collector.wait_tokens(701, 2)
    engine.cancel([701, 424242])  # the unknown id is ignored
    collector.wait_finished([701])
    assert collector.finish[701] == pb.FINISH_REASON_CANCELLED
    assert len(collector.tokens[701]) < 240
    time.sleep(0.3)
    assert len(collector.tokens[701]) < 240  # nothing after the cancellation
    stats = engine.stats()
    assert stats.requests_cancelled == before + 1
    assert stats.active_requests == 0
    # The engine keeps serving.
    (after,) = run(engine, collector, req(702, 3))
    assert len(after) == 3


def test_invalid_requests_are_error_outputs(engine, collector):
    engine.submit([req(801, 4, prompt=[1] * 300), req(802, 4, prompt=[]), req(803, 4, top_n=6)])
    collector.wait_finished([801, 802, 803])
    assert {collector.finish[i] for i in (801, 802, 803)} == {pb.FINISH_REASON_ERROR}
    assert "max_input_tokens is 255" in collector.errors[801]
    assert "empty" in collector.errors[802]
    assert "max_top_n_tokens is 5" in collector.errors[803]


def test_outputs_are_coalesced(engine, collector):
    before = collector.batches
    ids = [900 + i for i in range(4)]
    run(engine, collector, *[req(i, 16) for i in ids])
    # Four requests of 16 tokens in a batch of 4: about 16 messages, not 64.
    emits = collector.batches - before
    assert emits < 32, emits
    assert all(len(collector.tokens[i]) == 16 for i in ids)


def test_stats_count_tokens_and_requests(engine, collector):
    before = engine.stats()
    run(engine, collector, req(1001, 5), req(1002, 3))
    after = engine.stats()
    assert after.tokens_generated - before.tokens_generated == 8
    assert after.requests_finished - before.requests_finished == 2
    assert after.requests_received - before.requests_received == 2
    assert after.kv_block_size == 32
    assert after.kv_blocks_used + after.kv_blocks_free >= 256 // 32


def test_outputs_come_once_per_step_from_the_manager_thread(tiny_llama_dir):
    """Each engine step's outputs reach the server as one message, handed over by the manager's
    own thread (no per-token queue between threads)."""
    threads: set[str] = set()
    sizes: list[int] = []

    class Recording(Collector):
        def emit(self, batch):
            threads.add(threading.current_thread().name)
            sizes.append(len(batch.outputs))
            super().emit(batch)

    collector = Recording()
    eng = TransformersEngine(
        tiny_llama_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=32)
    )
    eng.start(collector.emit)
    try:
        ids = [1, 2, 3, 4]
        eng.submit([req(i, 12) for i in ids])
        collector.wait_finished(ids)
        assert threads == {eng.manager._generation_thread.name}
        # 4 requests of 12 tokens: at most one message per step, and the steps where all four
        # decode together carry four outputs in one message.
        assert sum(sizes) <= 4 * 12 and max(sizes) == 4
        stats = eng.stats()
        assert stats.iterations == len(sizes)
        assert 0 < stats.last_iteration_ms < 10_000
    finally:
        eng.shutdown()


def test_a_failing_forward_fails_the_requests_in_it(tiny_llama_dir):
    collector = Collector()
    eng = TransformersEngine(
        tiny_llama_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=32)
    )
    eng.start(collector.emit)
    try:

        def broken(*args, **kwargs):
            raise RuntimeError("device lost")

        eng.model.forward = broken
        eng.submit([req(1, 8), req(2, 8)])
        collector.wait_finished([1, 2], timeout=30)
        assert collector.finish[1] == collector.finish[2] == pb.FINISH_REASON_ERROR
        assert "device lost" in collector.errors[1]
    finally:
        eng.shutdown()


@pytest.fixture
def cudnn_sdp_restored():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_engines_keep_sdpa_off_cudnn(cudnn_sdp_restored):
    # cuDNN attention plans each new (queries, keys) shape, and the batch's key length changes
    # every step: on an H100 that was ~75 ms a step (benchmarks/sdpa_shapes.py).
    _configure_attention(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled(), "a CPU engine has no business with it"
    _configure_attention(torch.device("cuda:0"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()


# --- the sampling set: penalties, logit bias, min_new_tokens ---------------------------------


def test_logit_bias_bans_the_greedy_token_and_forces_another(engine, collector):
    (greedy,) = run(engine, collector, req(1101, 4))
    banned, forced = run(
        engine,
        collector,
        req(1102, 4, logit_bias={greedy[0]: -100.0}),
        req(1103, 4, logit_bias={77: 100.0}),
    )
    assert greedy[0] not in banned
    assert forced == [77, 77, 77, 77]


def test_repetition_penalty_steers_away_from_seen_tokens(model, engine, collector):
    # A greedy run of the tiny model repeats itself; with a strong penalty the greedy path
    # changes at the first position whose argmax was already in the prompt or the output.
    (plain,) = run(engine, collector, req(1201, 16))
    (penalized,) = run(
        engine, collector, req(1202, 16, sampling=pb.SamplingParams(repetition_penalty=50.0))
    )
    assert penalized != plain
    # Check the first step against the definition on the model's own logits.
    logits = position_logits(model, PROMPT, penalized[:1])[0]
    seen = torch.tensor(sorted(set(PROMPT)))
    expected = logits.clone()
    expected[seen] = torch.where(logits[seen] < 0, logits[seen] * 50.0, logits[seen] / 50.0)
    assert penalized[0] == int(expected.argmax())


def test_frequency_and_presence_penalties_change_greedy_output(engine, collector):
    (plain,) = run(engine, collector, req(1301, 24))
    assert len(set(plain)) < len(plain), "the tiny model is expected to repeat itself"
    freq, pres = run(
        engine,
        collector,
        req(1302, 24, sampling=pb.SamplingParams(frequency_penalty=2.0)),
        req(1303, 24, sampling=pb.SamplingParams(presence_penalty=2.0)),
    )
    # Penalizing what was generated gives more distinct tokens than the plain greedy run.
    assert len(set(freq)) > len(set(plain)) and len(set(pres)) > len(set(plain))


def test_min_new_tokens_delays_eos_and_stop_tokens(engine, collector):
    (greedy,) = run(engine, collector, req(1401, 12))
    eos_like = greedy[2]
    saved = engine.eos_ids
    engine.eos_ids = [eos_like]
    try:
        early, delayed = run(
            engine,
            collector,
            req(1402, 12, ignore_eos=False),
            req(1403, 12, ignore_eos=False, min_new_tokens=6),
        )
    finally:
        engine.eos_ids = saved
    assert early == greedy[:3] and collector.finish[1402] == pb.FINISH_REASON_EOS_TOKEN
    assert len(delayed) >= 6 and eos_like not in delayed[:5]
    assert delayed[:2] == greedy[:2]
    stop_at = greedy[3]
    (stopped,) = run(engine, collector, req(1404, 12, stop=[stop_at], min_new_tokens=8))
    assert len(stopped) >= 8 and stop_at not in stopped[:7]


def test_a_stop_token_is_included_and_ends_with_stop_token(engine, collector):
    (greedy,) = run(engine, collector, req(1501, 10))
    (stopped,) = run(engine, collector, req(1502, 10, stop=[greedy[1]], min_new_tokens=1))
    assert stopped == greedy[:2] and collector.finish[1502] == pb.FINISH_REASON_STOP_TOKEN


def test_batch_neighbours_are_untouched_by_a_requests_settings(engine, collector):
    (alone,) = run(engine, collector, req(1601, 12))
    busy = pb.SamplingParams(
        do_sample=True, temperature=1.3, typical_p=0.8, repetition_penalty=3.0, seed=1,
        frequency_penalty=1.0, presence_penalty=1.0,
    )  # fmt: skip
    shared, _, _ = run(
        engine,
        collector,
        req(1602, 12),
        req(1603, 12, sampling=busy, logit_bias={alone[0]: -100.0}, min_new_tokens=12),
        req(1604, 12, logit_bias={alone[0]: 100.0}),
    )
    assert shared == alone


def test_a_grammar_is_refused_where_there_is_no_tokenizer(engine, collector):
    grammar = pb.Grammar(kind=pb.GRAMMAR_KIND_REGEX, value="[0-9]+")
    engine.submit([req(1701, 4, grammar=grammar), req(1702, 4)])
    collector.wait_finished([1701, 1702])
    assert collector.finish[1701] == pb.FINISH_REASON_ERROR
    assert "grammar is not supported" in collector.errors[1701]
    assert collector.finish[1702] == pb.FINISH_REASON_LENGTH


def test_a_request_whose_recorded_tokens_disagree_is_failed_not_continued(
    engine, collector, monkeypatch
):
    # Penalties and grammars are built on the processor's record of the chosen tokens; if it
    # ever missed one, the request must end with an error rather than go on with wrong state.
    from tensorgate.executor.engines.cb_sampling import PerRequestSampler

    monkeypatch.setattr(PerRequestSampler, "_track", staticmethod(lambda final, rows: None))
    penalized = pb.SamplingParams(repetition_penalty=1.2)
    run(engine, collector, req(1801, 6, sampling=penalized), req(1802, 6))
    assert collector.finish[1801] == pb.FINISH_REASON_ERROR
    assert "record of the chosen tokens disagrees" in collector.errors[1801]
    assert collector.tokens[1801] == []
    assert collector.finish[1802] == pb.FINISH_REASON_LENGTH and len(collector.tokens[1802]) == 6
