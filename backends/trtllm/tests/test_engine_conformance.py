"""One contract, every engine: synthetic, transformers (the tiny random llama, on CPU), trtllm
on an engine directory (the TEST DOUBLE of TensorRT-LLM's executor bindings) and trtllm on a
checkpoint (the TEST DOUBLE of its LLM API; tests/doubles: neither is a GPU run).

What every engine owes the server (engine.py): each request ends exactly once and nothing
follows its end; max_new_tokens is honoured; cancel ends a request with CANCELLED; a request
over the limits ends in ERROR with a message naming the limit; info and limits are sane; the
Stats counters move; shutdown ends the requests still live.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
from conftest import TRTLLM_ENGINES, Collector

from tensorgate.executor.engine import Engine, EngineFeatures, EngineLimits
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(300)

ENGINES = ("synthetic", "transformers", "trtllm", "trtllm-llmapi")
PROMPT = [1, 17, 42, 99, 3]


class StrictCollector(Collector):
    """A Collector that also records any output that follows a request's end."""

    def __init__(self) -> None:
        super().__init__()
        self.after_end: list[int] = []
        self._ended: set[int] = set()
        self._guard = threading.Lock()

    def emit(self, batch: pb.IterationOutput) -> None:
        with self._guard:
            for o in batch.outputs:
                if o.request_id in self._ended:
                    self.after_end.append(o.request_id)
                if o.finish_reason:
                    self._ended.add(o.request_id)
        super().emit(batch)


def _make(kind: str, request: pytest.FixtureRequest) -> Engine:
    if kind == "synthetic":
        from tensorgate.executor.engines.synthetic import SyntheticEngine

        return SyntheticEngine(
            iteration_ms=5, max_batch_size=8, max_input_tokens=64, max_total_tokens=256,
            vocab_size=128,
        )  # fmt: skip
    if kind == "transformers":
        from tensorgate.executor.engines.transformers_engine import (
            TransformersEngine,
            TransformersSettings,
        )

        model_dir = request.getfixturevalue("tiny_llama_dir")
        return TransformersEngine(
            model_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=32)
        )
    if kind == "trtllm":
        from tensorgate.executor.engines.trtllm_engine import TrtllmEngine, TrtllmSettings

        double = request.getfixturevalue("trtllm_double")  # NOT TensorRT-LLM: a test double
        double.TEST_DOUBLE.iteration_ms = 5
        return TrtllmEngine(
            TRTLLM_ENGINES / "llama-tp1-bf16",
            TrtllmSettings(max_total_tokens=256),
            gpu_count=lambda: 1,
        )
    if kind == "trtllm-llmapi":
        from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine
        from tensorgate.executor.engines.trtllm_llmapi_config import LlmApiSettings

        double = request.getfixturevalue("llmapi_double")  # NOT TensorRT-LLM: a test double
        double.TEST_DOUBLE.iteration_ms = 5
        return TrtllmLlmApiEngine(
            request.getfixturevalue("tiny_llama_dir"),
            LlmApiSettings(max_total_tokens=256),
            gpu_count=lambda: 1,
        )
    raise AssertionError(kind)


@dataclasses.dataclass
class Harness:
    kind: str
    engine: Engine
    collector: StrictCollector
    shut: bool = False

    @property
    def limits(self) -> EngineLimits:
        return self.engine.info().limits

    def run(self, *requests: pb.GenerateRequest, timeout: float = 120) -> None:
        self.engine.submit(list(requests))
        self.collector.wait_finished([r.id for r in requests], timeout=timeout)

    def shutdown(self) -> None:
        if not self.shut:
            self.shut = True
            self.engine.shutdown()


@pytest.fixture(params=ENGINES)
def harness(request: pytest.FixtureRequest):
    collector = StrictCollector()
    engine = _make(request.param, request)
    engine.start(collector.emit)
    h = Harness(request.param, engine, collector)
    yield h
    h.shutdown()
    assert collector.after_end == [], f"outputs after a request's end: {collector.after_end}"


def req(rid: int, n: int, prompt=PROMPT) -> pb.GenerateRequest:
    # ignore_eos: a random tiny model may pick its eos at any step.
    return pb.GenerateRequest(id=rid, input_ids=list(prompt), max_new_tokens=n, ignore_eos=True)


def long_request(h: Harness, rid: int) -> pb.GenerateRequest:
    return req(rid, h.limits.max_total_tokens - len(PROMPT))


def test_info_and_limits_are_sane(harness):
    info = harness.engine.info()
    assert info.engine == harness.kind.removesuffix("-llmapi")
    assert info.vocab_size > 0
    assert isinstance(info.features, EngineFeatures)
    lim = info.limits
    assert lim.max_batch_size >= 1
    assert 1 <= lim.max_input_tokens < lim.max_total_tokens
    assert lim.max_num_tokens >= 1
    assert lim.max_top_n_tokens >= 0
    # The router's admission budget defaults to it; 0 would leave nothing to enforce (the
    # router refuses to start on it without --max-batch-total-tokens).
    assert info.kv_capacity_tokens >= lim.max_total_tokens
    if lim.max_top_n_tokens == 0:
        assert not info.features.top_n_tokens
    proto = info.to_proto("conformance")
    assert proto.limits.max_total_tokens == lim.max_total_tokens


def test_every_request_ends_exactly_once_and_max_new_tokens_is_honoured(harness):
    lengths = [1, 2, 3, 5, 8, 13]
    requests = [req(100 + i, n) for i, n in enumerate(lengths)]
    harness.run(*requests)
    c = harness.collector
    for r, n in zip(requests, lengths, strict=True):
        assert c.finish[r.id] == pb.FINISH_REASON_LENGTH, (r.id, c.errors.get(r.id))
        assert len(c.tokens[r.id]) == n
        assert all(0 <= t < harness.engine.info().vocab_size for t in c.tokens[r.id])
    assert set(c.finish) == {r.id for r in requests}


def test_cancel_gives_cancelled(harness):
    h = harness
    h.engine.submit([long_request(h, 1)])
    h.collector.wait_tokens(1, 2)
    h.engine.cancel([1, 987654])  # an unknown id is ignored
    h.collector.wait_finished([1])
    assert h.collector.finish[1] == pb.FINISH_REASON_CANCELLED
    assert len(h.collector.tokens[1]) < h.limits.max_total_tokens - len(PROMPT)
    h.engine.cancel([1])  # after its end: ignored, no second end
    assert h.engine.stats().requests_cancelled == 1


def test_requests_over_limits_end_in_error_with_a_message(harness):
    h = harness
    lim = h.limits
    too_long = req(1, 1, prompt=[3] * (lim.max_input_tokens + 1))
    too_many = req(2, lim.max_total_tokens - len(PROMPT) + 1)
    empty = req(3, 4, prompt=[])
    zero = req(4, 0)
    h.run(too_long, too_many, empty, zero)
    c = h.collector
    assert all(c.finish[i] == pb.FINISH_REASON_ERROR for i in (1, 2, 3, 4))
    assert f"max_input_tokens is {lim.max_input_tokens}" in c.errors[1]
    assert f"max_total_tokens of {lim.max_total_tokens}" in c.errors[2]
    assert "empty" in c.errors[3]
    assert "max_new_tokens is 0" in c.errors[4]
    assert all(c.tokens.get(i, []) == [] for i in (1, 2, 3, 4))
    # The engine still serves.
    h.run(req(5, 2))
    assert c.finish[5] == pb.FINISH_REASON_LENGTH


def test_stats_counters_move(harness):
    h = harness
    before = h.engine.stats()
    h.run(req(1, 3), req(2, 4))
    after = h.engine.stats()
    assert after.requests_received == before.requests_received + 2
    assert after.requests_finished == before.requests_finished + 2
    assert after.tokens_generated >= before.tokens_generated + 7
    assert after.iterations > before.iterations
    assert after.kv_block_size > 0
    assert after.active_requests == 0


def test_shutdown_ends_live_requests(harness):
    h = harness
    h.engine.submit([long_request(h, 1), long_request(h, 2)])
    h.collector.wait_tokens(1, 1)
    h.shutdown()
    c = h.collector
    c.wait_finished([1, 2], timeout=30)
    assert c.finish[1] == c.finish[2] == pb.FINISH_REASON_ERROR
    assert "shutting down" in c.errors[1]


# --- the structured-output contract: what an engine claims it enforces, what it does not it
# refuses (a request never runs without a constraint it asked for) --------------------------


def _unclaimed_requests(
    features: EngineFeatures, first_id: int
) -> list[tuple[str, pb.GenerateRequest]]:
    """One request per feature the engine does not claim, each using only that feature."""
    out = []
    uses = {
        "guided_decoding": ("grammar", lambda r: r.grammar.MergeFrom(
            pb.Grammar(kind=pb.GRAMMAR_KIND_REGEX, value="[0-9]+"))),
        "logit_bias": ("logit_bias", lambda r: r.logit_bias.update({7: -100.0})),
        "min_new_tokens": ("min_new_tokens", lambda r: setattr(r, "min_new_tokens", 2)),
        "repetition_penalty": ("repetition_penalty",
                               lambda r: setattr(r.sampling, "repetition_penalty", 1.5)),
        "frequency_penalty": ("frequency_penalty",
                              lambda r: setattr(r.sampling, "frequency_penalty", 0.5)),
        "presence_penalty": ("presence_penalty",
                             lambda r: setattr(r.sampling, "presence_penalty", 0.5)),
    }  # fmt: skip
    for flag, (field, use) in uses.items():
        if getattr(features, flag):
            continue
        r = req(first_id + len(out), 3)
        use(r)
        out.append((field, r))
    return out


def test_unclaimed_features_end_in_error_naming_the_field(harness):
    h = harness
    refused = _unclaimed_requests(h.engine.info().features, 10)
    h.run(*(r for _, r in refused), req(99, 2))
    c = h.collector
    for field, r in refused:
        assert c.finish[r.id] == pb.FINISH_REASON_ERROR, (field, c.tokens[r.id])
        assert field in c.errors[r.id], (field, c.errors[r.id])
        assert c.tokens[r.id] == []
    assert c.finish[99] == pb.FINISH_REASON_LENGTH  # the engine still serves


def test_stop_token_ids_and_min_new_tokens_are_honoured_where_claimed(harness, request):
    h = harness
    f = h.engine.info().features
    if h.kind == "trtllm":
        # Found by this test (2026-11-28): the engine-directory engine claims min_new_tokens
        # (SamplingConfig.min_tokens), which holds off the end id but, on its double, not
        # stop_token_ids, as the contract says it must. Strict: it fails once that is fixed.
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="min_tokens does not hold off stop ids")
        )
    if not f.stop_token_ids:
        pytest.skip(f"{h.kind} does not claim stop_token_ids")
    c = h.collector

    def run_again(r: pb.GenerateRequest) -> tuple[list[int], int]:
        # Ids are unique among live requests only: the same id again replays a synthetic
        # stream, whose tokens are a function of the id.
        h.run(r)
        with c._guard:
            c._ended.discard(r.id)
        return c.tokens.pop(r.id), c.finish.pop(r.id)

    plain, _ = run_again(req(1, 8))
    stop_at = plain[1]
    stopped = req(1, 8)
    stopped.stop_token_ids.append(stop_at)
    tokens, finish = run_again(stopped)
    assert finish == pb.FINISH_REASON_STOP_TOKEN
    assert tokens == plain[: plain.index(stop_at) + 1]
    if not f.min_new_tokens:
        return
    held = req(1, 8)
    held.stop_token_ids.append(stop_at)
    held.min_new_tokens = 4
    tokens, _ = run_again(held)
    # A stop id before min_new_tokens does not end the request (a model engine masks it; the
    # synthetic one, whose tokens are fixed, emits it and goes on).
    assert len(tokens) >= 4, tokens
