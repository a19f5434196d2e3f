"""Prompt log probabilities (GenerateRequest.return_prompt_logprobs) in every engine: the
transformers engine against a direct forward pass of the same (tiny, random) checkpoint; the
synthetic engine's documented values; both trtllm flavours against the TEST DOUBLEs of
TensorRT-LLM (tests/doubles; NOT TensorRT-LLM), whose context logits are a known pattern."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Collector, make_trtllm_engine_dir

from tensorgate.executor.engines import prompt_logprobs as plp
from tensorgate.executor.engines.synthetic import SyntheticEngine, prompt_logprob
from tensorgate.executor.engines.transformers_engine import (
    TransformersEngine,
    TransformersSettings,
)
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(300)

PROMPT = [1, 17, 42, 99, 3, 64, 7]


class PromptCollector(Collector):
    """Also records each request's prompt log probabilities, and checks they come on its first
    output only."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt: dict[int, list[float]] = {}
        self.prompt_top: dict[int, list[pb.TopTokens]] = {}
        self._seen: set[int] = set()

    def emit(self, batch: pb.IterationOutput) -> None:
        for o in batch.outputs:
            if o.prompt_logprobs or o.prompt_top_tokens:
                assert o.request_id not in self._seen, "prompt log probabilities after the first"
                self.prompt[o.request_id] = list(o.prompt_logprobs)
                self.prompt_top[o.request_id] = list(o.prompt_top_tokens)
            self._seen.add(o.request_id)
        super().emit(batch)


def req(rid, prompt=PROMPT, n=3, top_n=0, prompt_logprobs=True, **fields):
    return pb.GenerateRequest(
        id=rid,
        input_ids=list(prompt),
        max_new_tokens=n,
        sampling=fields.pop("sampling", pb.SamplingParams()),
        ignore_eos=True,
        top_n_tokens=top_n,
        return_prompt_logprobs=prompt_logprobs,
        **fields,
    )


def run(engine, collector, *requests):
    engine.submit(list(requests))
    collector.wait_finished([r.id for r in requests])


def expected_from(logits: torch.Tensor, prompt: list[int], top_n: int = 0):
    """log_softmax of position i - 1 at token i, for i >= 1, and the top n there."""
    lsm = torch.log_softmax(logits.float(), dim=-1)[: len(prompt) - 1]
    chosen = lsm.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1).tolist()
    top = torch.topk(lsm, top_n, dim=-1) if top_n else None
    return chosen, top


# -- the arithmetic ------------------------------------------------------------------------------


def test_from_logits_chunks_and_drops_padded_columns(monkeypatch):
    monkeypatch.setattr(plp, "ROWS", 2)  # several chunks for a 7-token prompt
    torch.manual_seed(1)
    logits = torch.randn(len(PROMPT), 128)
    padded = torch.cat([logits, torch.full((len(PROMPT), 8), 50.0)], dim=1)
    got = plp.from_logits(padded.unsqueeze(0), PROMPT, 3, vocab_size=128)
    chosen, top = expected_from(logits, PROMPT, 3)
    assert got.logprobs == pytest.approx(chosen, abs=1e-5)
    assert got.top_ids == top.indices.tolist()
    for row, want in zip(got.top_logprobs, top.values.tolist(), strict=True):
        assert row == pytest.approx(want, abs=1e-5)
    assert plp.from_logits(logits, [5], 3).logprobs == []  # one token: nothing to score
    with pytest.raises(ValueError, match="for a prompt of 7 tokens"):
        plp.from_logits(logits[:3], PROMPT, 0)
    with pytest.raises(ValueError, match="no prompt logits"):
        plp.from_logits(None, PROMPT, 0)
    with pytest.raises(ValueError, match="outside the 64 logits"):
        plp.from_logits(logits[:, :64], PROMPT, 0)


# -- transformers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tcollector():
    return PromptCollector()


@pytest.fixture(scope="module")
def tengine(tiny_llama_dir, tcollector):
    eng = TransformersEngine(
        tiny_llama_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=32)
    )
    eng.start(tcollector.emit)
    yield eng
    eng.shutdown()


def test_transformers_claims_prompt_logprobs(tengine):
    assert tengine.info().features.prompt_logprobs
    assert tengine.info().to_proto("x").features.prompt_logprobs


def test_transformers_prompt_logprobs_equal_a_direct_forward(model, tengine, tcollector):
    run(tengine, tcollector, req(1, top_n=3))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
    chosen, top = expected_from(logits, PROMPT, 3)
    assert tcollector.prompt[1] == pytest.approx(chosen, abs=1e-4)
    tops = tcollector.prompt_top[1]
    assert len(tops) == len(PROMPT) - 1
    for i, t in enumerate(tops):
        assert list(t.ids) == top.indices[i].tolist()
        assert list(t.logprobs) == pytest.approx(top.values[i].tolist(), abs=1e-4)
    assert tcollector.finish[1] == pb.FINISH_REASON_LENGTH


def test_transformers_prompt_logprobs_are_raw_whatever_the_sampling(model, tengine, tcollector):
    """Temperature, logit bias and penalties shape the generated tokens, never the prompt's
    values (TGI's prefill and vLLM's prompt_logprobs are the model's own)."""
    sampling = pb.SamplingParams(do_sample=True, temperature=0.5, seed=3, repetition_penalty=1.3)
    run(tengine, tcollector, req(2, sampling=sampling, logit_bias={17: -50.0}), req(3))
    assert tcollector.prompt[2] == pytest.approx(tcollector.prompt[3], abs=1e-6)
    assert tcollector.prompt_top[3] == []  # no alternatives unless top_n_tokens


def test_transformers_batch_neighbours_get_none(tengine, tcollector):
    run(tengine, tcollector, req(4), req(5, prompt_logprobs=False), req(6, prompt=[9]))
    assert 5 not in tcollector.prompt
    assert 6 not in tcollector.prompt  # a one-token prompt has nothing to score
    assert tcollector.finish[6] == pb.FINISH_REASON_LENGTH
    assert len(tcollector.prompt[4]) == len(PROMPT) - 1


def test_transformers_a_failed_pass_fails_its_request_not_the_engine(
    tengine, tcollector, monkeypatch
):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(plp, "score_prompt", boom)
    run(tengine, tcollector, req(7))
    assert tcollector.finish[7] == pb.FINISH_REASON_ERROR
    assert "prompt's log probabilities" in tcollector.errors[7]
    assert "out of memory (simulated)" in tcollector.errors[7]
    monkeypatch.undo()
    run(tengine, tcollector, req(8))  # the manager's loop is alive
    assert tcollector.finish[8] == pb.FINISH_REASON_LENGTH
    assert len(tcollector.prompt[8]) == len(PROMPT) - 1


def test_transformers_cancelled_requests_leave_nothing_behind(tengine, tcollector):
    tengine.submit([req(9, n=200)])
    tengine.cancel([9])
    tcollector.wait_finished([9])
    run(tengine, tcollector, req(10))  # a step after the cancel, so its state is settled
    s = tengine.prompts
    assert not s._pending and not s._done and not s._registered


# -- synthetic -----------------------------------------------------------------------------------


def test_synthetic_prompt_logprobs_are_its_documented_values():
    engine = SyntheticEngine(iteration_ms=1, max_batch_size=2, vocab_size=5000)
    collector = PromptCollector()
    engine.start(collector.emit)
    try:
        assert engine.info().features.prompt_logprobs
        prompt = [1200, 1201, 1999, 3000]
        # Four requests for two slots: the later two start in a later iteration.
        run(
            engine,
            collector,
            req(1, prompt=prompt, n=4),
            req(2, prompt=prompt, prompt_logprobs=False),
            req(3, prompt=prompt[1:], n=2),
            req(4, prompt=prompt),
        )
        assert collector.prompt[1] == [prompt_logprob(prompt[i], i) for i in range(1, 4)]
        assert collector.prompt[1] == [-0.75, -0.5, -1.0]
        assert 2 not in collector.prompt
        assert collector.prompt[3] == [prompt_logprob(prompt[i + 1], i) for i in range(1, 3)]
        assert collector.prompt[4] == collector.prompt[1]
        assert all(len(collector.tokens[r]) == n for r, n in ((1, 4), (2, 3), (3, 2), (4, 3)))
    finally:
        engine.shutdown()


# -- trtllm, executor flavour (engine directory) ---------------------------------------------------


@pytest.fixture
def trt_start(trtllm_double, tmp_path):
    from tensorgate.executor.engines.trtllm_engine import TrtllmEngine

    engines = []
    collector = PromptCollector()

    def start(**build_config) -> TrtllmEngine:
        d = make_trtllm_engine_dir(tmp_path / str(len(engines)), **build_config)
        engine = TrtllmEngine(d, gpu_count=lambda: 8)
        engine.start(collector.emit)
        engines.append(engine)
        return engine

    yield start, collector
    for engine in engines:
        engine.shutdown()


TRT_PROMPT = [128000, 9906, 1917, 11, 220]


def test_trtllm_engine_dir_reads_them_from_context_logits(trt_start, trtllm_double):
    start, collector = trt_start
    engine = start(gather_context_logits=True)
    assert engine.info().features.prompt_logprobs
    run(engine, collector, req(1, prompt=TRT_PROMPT), req(2, prompt=TRT_PROMPT, n=1))
    sent = [r for r in trtllm_double.TEST_DOUBLE.requests if r.input_token_ids == TRT_PROMPT]
    assert all(r.output_config.return_context_logits for r in sent)
    logits = trtllm_double.double_context_logits(TRT_PROMPT, 128256)
    chosen, _ = expected_from(logits, TRT_PROMPT)
    assert collector.prompt[1] == pytest.approx(chosen, abs=1e-5)
    assert collector.prompt[2] == collector.prompt[1]
    assert len(collector.tokens[1]) == 3 and collector.finish[1] == pb.FINISH_REASON_LENGTH


def test_trtllm_engine_dir_without_gather_context_logits_refuses(trt_start):
    start, collector = trt_start
    engine = start()  # the fixture engines are built without gather_context_logits
    assert not engine.info().features.prompt_logprobs
    run(engine, collector, req(3, prompt=TRT_PROMPT))
    assert collector.finish[3] == pb.FINISH_REASON_ERROR
    assert "gather_context_logits" in collector.errors[3]


def test_trtllm_engine_dir_missing_context_logits_fail_the_request(trt_start, trtllm_double):
    start, collector = trt_start
    engine = start(gather_context_logits=True)
    trtllm_double.TEST_DOUBLE.no_context_logits_for.add(len(TRT_PROMPT))
    run(engine, collector, req(4, prompt=TRT_PROMPT))
    assert collector.finish[4] == pb.FINISH_REASON_ERROR
    assert "no usable prompt logits" in collector.errors[4]
    assert collector.tokens[4] == []


# -- trtllm, LLM API flavour (checkpoint) ------------------------------------------------------


@pytest.fixture
def llm_start(llmapi_double, tmp_path):
    from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine

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
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    collector = PromptCollector()
    engine = TrtllmLlmApiEngine(d, gpu_count=lambda: 8)
    engine.start(collector.emit)
    yield engine, collector
    engine.shutdown()


def test_trtllm_llmapi_reads_them_from_context_logits(llm_start, llmapi_double):
    engine, collector = llm_start
    assert engine.info().features.prompt_logprobs
    prompt = [11, 12, 13, 500, 999]
    run(engine, collector, req(1, prompt=prompt), req(2, prompt=prompt, prompt_logprobs=False))
    asked = [sp.return_context_logits for p, sp in llmapi_double.TEST_DOUBLE.requests[-2:]]
    assert sorted(asked) == [False, True]
    logits = llmapi_double.double_context_logits(prompt, 1000)
    chosen, _ = expected_from(logits, prompt)
    assert collector.prompt[1] == pytest.approx(chosen, abs=1e-5)
    assert 2 not in collector.prompt
    assert len(collector.tokens[1]) == 3


def test_trtllm_llmapi_missing_context_logits_fail_the_request(llm_start, llmapi_double):
    engine, collector = llm_start
    llmapi_double.TEST_DOUBLE.no_context_logits_for.add(4)
    run(engine, collector, req(3, prompt=[11, 12, 13, 14]))
    assert collector.finish[3] == pb.FINISH_REASON_ERROR
    assert "no usable prompt logits" in collector.errors[3]
