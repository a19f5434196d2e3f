"""Migration (GenerateRequest.resumed_tokens): a request resumed with the first j of its K tokens
appended to its prompt continues exactly where it stopped: the synthetic engine's stream (keyed
by the router's id, through the real gRPC server), and the transformers engine's seeded sampling
and penalties (on the embedded SmolLM2-135M, CPU). TensorRT-LLM (test doubles) refuses a seeded
resume, which it cannot continue. A bad resumed_tokens fails its request, naming the field."""

from __future__ import annotations

import pytest
import torch
from conftest import Collector
from test_server import Stream, served

from tensorgate.executor.engine import EngineLimits, check_request
from tensorgate.executor.engines.cb_penalties import TokenHistory
from tensorgate.executor.engines.synthetic import SyntheticEngine, stream_key
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(300)

PROMPT = [1, 4093, 314, 253, 2694, 30]  # ordinary SmolLM2 ids (below its 49152 vocabulary)
K, J = 8, 3


def resumed(first: pb.GenerateRequest, tokens: list[int], j: int) -> pb.GenerateRequest:
    """`first` as the router re-submits it after j tokens: prompt + those tokens, the rest of
    the budget, the same id, seed and settings."""
    r = pb.GenerateRequest()
    r.CopyFrom(first)
    r.input_ids.extend(tokens[:j])
    r.max_new_tokens = first.max_new_tokens - j
    r.resumed_tokens = j
    return r


# -- validation ----------------------------------------------------------------------------------

LIMITS = EngineLimits(
    max_batch_size=4, max_input_tokens=100, max_total_tokens=200, max_num_tokens=1
)


def test_resumed_tokens_beyond_the_input_is_refused_naming_the_field():
    r = pb.GenerateRequest(id=1, input_ids=[1, 2, 3], max_new_tokens=2, resumed_tokens=4)
    assert check_request(r, LIMITS) == (
        "resumed_tokens is 4, more than the 3 input_ids it counts back from: it must be at most "
        "len(input_ids)"
    )
    r.resumed_tokens = 3
    assert check_request(r, LIMITS) is None


def test_a_constrained_request_cannot_be_resumed():
    r = pb.GenerateRequest(id=1, input_ids=[1, 2, 3], max_new_tokens=2, resumed_tokens=1)
    r.grammar.kind = pb.GRAMMAR_KIND_REGEX
    r.grammar.value = "a+"
    assert "cannot be resumed" in check_request(r, LIMITS)


# -- synthetic -----------------------------------------------------------------------------------


@pytest.fixture
def synthetic(collector):
    engine = SyntheticEngine(iteration_ms=2, max_batch_size=8)
    engine.start(collector.emit)
    yield engine
    engine.shutdown()


def test_synthetic_resume_continues_the_stream(synthetic, collector):
    first = pb.GenerateRequest(id=7, input_ids=PROMPT, max_new_tokens=K)
    synthetic.submit([first])
    collector.wait_finished([7])
    whole = collector.tokens[7]
    assert whole == [synthetic.token(stream_key(PROMPT), s) for s in range(K)]
    # Same id: a fresh collector, as a second executor would have.
    again = Collector()
    other = SyntheticEngine(iteration_ms=2, max_batch_size=8)
    other.start(again.emit)
    try:
        other.submit([resumed(first, whole, J)])
        again.wait_finished([7])
    finally:
        other.shutdown()
    assert again.tokens[7] == whole[J:]
    assert again.finish[7] == pb.FINISH_REASON_LENGTH


def test_synthetic_bad_resume_is_an_error_output(synthetic, collector):
    bad = pb.GenerateRequest(id=8, input_ids=[1, 2], max_new_tokens=2, resumed_tokens=3)
    synthetic.submit([bad])
    collector.wait_finished([8])
    assert collector.finish[8] == pb.FINISH_REASON_ERROR
    assert "resumed_tokens is 3" in collector.errors[8]
    assert collector.tokens[8] == []


@pytest.fixture
def served_synthetic(tmp_path):
    """The synthetic engine behind the real gRPC server, on a unix socket."""
    sock = tmp_path / "executor.sock"
    engine = SyntheticEngine(iteration_ms=2, max_batch_size=8)
    with served(engine, sock) as (stub, _):
        yield stub, engine


def test_synthetic_resume_through_the_server_keys_by_the_prompt(served_synthetic):
    """The server gives the engine its own ids; the stream follows the prompt, which a migrated
    request keeps (its input less the resumed tokens), whatever id it gets on its next
    executor."""
    stub, engine = served_synthetic
    first = pb.GenerateRequest(id=42, input_ids=PROMPT, max_new_tokens=K)
    s = Stream(stub)
    # Other requests first, so that 42's engine id is not 42 (nor its resumed twin's).
    warmup = [pb.GenerateRequest(id=i, input_ids=PROMPT, max_new_tokens=1) for i in (1, 2, 3)]
    s.send(pb.GenerateCommand(requests=warmup))
    s.read_until(lambda: len(s.finish) == 3)
    s.send(pb.GenerateCommand(requests=[first]))
    s.read_until(lambda: 42 in s.finish)
    whole = s.tokens[42]
    assert whole == [engine.token(stream_key(PROMPT), step) for step in range(K)]
    s2 = Stream(stub)
    s2.send(pb.GenerateCommand(requests=[resumed(first, whole, J)]))
    s2.read_until(lambda: 42 in s2.finish)
    assert s2.tokens[42] == whole[J:]
    s.send(None)
    s2.send(None)


# -- transformers (the embedded SmolLM2-135M on CPU) ---------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from tensorgate.executor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )
    from tensorgate.models.embedded import ensure_embedded_model

    collector = Collector()
    engine = TransformersEngine(
        ensure_embedded_model(progress=False),
        TransformersSettings(device="cpu", max_batch_size=4, max_total_tokens=256, block_size=16),
    )
    engine.start(collector.emit)
    yield engine, collector
    engine.shutdown()


def _resume_matches(smollm2, rid: int, sampling: pb.SamplingParams) -> list[int]:
    engine, collector = smollm2
    first = pb.GenerateRequest(
        id=rid, input_ids=PROMPT, max_new_tokens=K, sampling=sampling, ignore_eos=True
    )
    engine.submit([first])
    collector.wait_finished([rid])
    whole = collector.tokens[rid]
    assert len(whole) == K
    again = resumed(first, whole, J)
    again.id = rid + 1  # ids are unique per engine; the transformers stream does not use them
    engine.submit([again])
    collector.wait_finished([rid + 1])
    assert collector.finish[rid + 1] == pb.FINISH_REASON_LENGTH
    assert whole[:J] + collector.tokens[rid + 1] == whole
    return whole


def test_transformers_seeded_sampling_resumes_token_for_token(smollm2):
    sampling = pb.SamplingParams(do_sample=True, temperature=1.5, seed=1234)
    whole = _resume_matches(smollm2, 100, sampling)
    # Sampled, not greedy: another seed draws another stream.
    engine, collector = smollm2
    sampling.seed = 99
    engine.submit(
        [
            pb.GenerateRequest(
                id=110, input_ids=PROMPT, max_new_tokens=K, sampling=sampling, ignore_eos=True
            )
        ]
    )
    collector.wait_finished([110])
    assert collector.tokens[110] != whole


def test_transformers_penalties_count_the_resumed_tokens(smollm2):
    # A strongly negative frequency penalty makes the first token repeat: a resumed request that
    # did not count its resumed tokens as generated would not be pushed to repeat them.
    sampling = pb.SamplingParams(
        do_sample=True, seed=7, frequency_penalty=-8.0, presence_penalty=0.5
    )
    _resume_matches(smollm2, 200, sampling)


def test_token_history_counts_resumed_tokens_as_generated():
    h = TokenHistory([5, 6, 7, 7], vocab=10, device=torch.device("cpu"), resumed=2)
    assert h.counts.tolist() == [0, 0, 0, 0, 0, 0, 0, 2, 0, 0]  # only the last two: 7, 7
    assert h.seen.nonzero().flatten().tolist() == [5, 6, 7]


# -- TensorRT-LLM (test doubles): greedy resumes, a seeded resume is refused -----------------------


def _seeded_resume(rid: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        id=rid,
        input_ids=[11, 12, 13, 14],
        max_new_tokens=2,
        resumed_tokens=1,
        sampling=pb.SamplingParams(do_sample=True, seed=5),
    )


def _refuses_a_seeded_resume_only(engine, collector) -> None:
    """A seeded resume fails naming why; a greedy one beside it runs."""
    engine.start(collector.emit)
    try:
        greedy = pb.GenerateRequest(
            id=2, input_ids=[11, 12, 13, 14], max_new_tokens=2, resumed_tokens=1
        )
        engine.submit([_seeded_resume(1), greedy])
        collector.wait_finished([1, 2])
    finally:
        engine.shutdown()
    assert collector.finish[1] == pb.FINISH_REASON_ERROR
    assert "seeded sampling cannot continue after a migration" in collector.errors[1]
    assert collector.finish[2] != pb.FINISH_REASON_ERROR


def test_trtllm_refuses_a_seeded_resume(trtllm_double, collector):
    from test_trtllm_engine import TP1

    from tensorgate.executor.engines.trtllm_engine import TrtllmEngine

    _refuses_a_seeded_resume_only(TrtllmEngine(TP1, None, gpu_count=lambda: 8), collector)


def test_llmapi_refuses_a_seeded_resume(llmapi_double, collector, tmp_path):
    import json

    from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
                    "max_position_embeddings": 512, "torch_dtype": "bfloat16"})
    )  # fmt: skip
    _refuses_a_seeded_resume_only(TrtllmLlmApiEngine(ckpt, None, gpu_count=lambda: 8), collector)
