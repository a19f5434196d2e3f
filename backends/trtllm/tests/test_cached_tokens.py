"""RequestOutput.cached_tokens: a request's first output says how many prompt tokens its KV took
from the prefix cache; later outputs say 0. Synthetic (its prefix-cache model), transformers
(its paged cache's prefix sharing, on a real tiny llama), TensorRT-LLM's two flavours (the
reused blocks of RequestPerfMetrics, on the test doubles)."""

from __future__ import annotations

import json

import pytest
from conftest import Collector

from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.executor.engines.trtllm_engine import cached_from_reused_blocks
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(120)


class CachedCollector(Collector):
    """Also keeps every output's cached_tokens, per request, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.cached: dict[int, list[int]] = {}

    def emit(self, batch: pb.IterationOutput) -> None:
        for o in batch.outputs:
            self.cached.setdefault(o.request_id, []).append(o.cached_tokens)
        super().emit(batch)


def run(engine, collector: CachedCollector, *requests: pb.GenerateRequest) -> None:
    engine.submit(list(requests))
    collector.wait_finished([r.id for r in requests])


def req(rid: int, prompt: list[int], n: int = 3) -> pb.GenerateRequest:
    return pb.GenerateRequest(id=rid, input_ids=prompt, max_new_tokens=n, ignore_eos=True)


def first_only(collector: CachedCollector, rid: int) -> int:
    """The first output's cached_tokens, checking that no later output repeats it."""
    first, *rest = collector.cached[rid]
    assert rest == [0] * len(rest)
    return first


# -- synthetic -----------------------------------------------------------------------------------


def test_synthetic_reports_the_blocks_its_prefix_cache_matched():
    collector = CachedCollector()
    engine = SyntheticEngine(iteration_ms=2, max_batch_size=8, block_size=16)
    engine.start(collector.emit)
    try:
        prompt = list(range(1000, 1040))  # 40 tokens: 2 full blocks and a part
        run(engine, collector, req(1, prompt))
        run(engine, collector, req(2, prompt))
        # The same first block, then another: one block.
        run(engine, collector, req(3, prompt[:16] + list(range(2000, 2020))))
        run(engine, collector, req(4, list(range(3000, 3010))))
    finally:
        engine.shutdown()
    assert [first_only(collector, i) for i in (1, 2, 3, 4)] == [0, 32, 16, 0]


def test_synthetic_without_prefix_reuse_reports_none():
    collector = CachedCollector()
    engine = SyntheticEngine(iteration_ms=2, max_batch_size=8, block_size=16, prefix_cache=False)
    engine.start(collector.emit)
    try:
        prompt = list(range(1000, 1040))
        run(engine, collector, req(1, prompt), req(2, prompt))
        run(engine, collector, req(3, prompt))
    finally:
        engine.shutdown()
    assert [first_only(collector, i) for i in (1, 2, 3)] == [0, 0, 0]


# -- transformers --------------------------------------------------------------------------------


def test_transformers_reports_its_prefix_sharing(tiny_llama_dir):
    from tensorgate.executor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )

    collector = CachedCollector()
    engine = TransformersEngine(
        tiny_llama_dir, TransformersSettings(device="cpu", max_batch_size=4, block_size=16)
    )
    engine.start(collector.emit)
    try:
        prompt = [1, *range(20, 59)]  # 40 tokens
        run(engine, collector, req(1, prompt))
        run(engine, collector, req(2, prompt))
        run(engine, collector, req(3, prompt[:16] + list(range(70, 90))))
    finally:
        engine.shutdown()
    # transformers matches whole blocks and never the whole prompt (its last token is computed).
    assert [first_only(collector, i) for i in (1, 2, 3)] == [0, 32, 16]
    assert collector.tokens[1] == collector.tokens[2]  # the cached KV gives the same answer


def test_transformers_without_prefix_sharing_reports_none(tiny_llama_dir):
    from tensorgate.executor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )

    collector = CachedCollector()
    settings = TransformersSettings(
        device="cpu", max_batch_size=4, block_size=16, prefix_sharing=False
    )
    engine = TransformersEngine(tiny_llama_dir, settings)
    engine.start(collector.emit)
    try:
        prompt = [1, *range(20, 59)]
        run(engine, collector, req(1, prompt))
        run(engine, collector, req(2, prompt))
    finally:
        engine.shutdown()
    assert [first_only(collector, i) for i in (1, 2)] == [0, 0]


# -- TensorRT-LLM (test doubles) -------------------------------------------------------------------


def test_reused_blocks_become_tokens_capped_below_the_prompt():
    class Kv:
        num_reused_blocks = 3

    class Metrics:
        kv_cache_metrics = Kv()

    assert cached_from_reused_blocks(Metrics(), 32, 200) == 96
    # A partly reused block counts whole in TensorRT-LLM: never more than the prompt less one.
    assert cached_from_reused_blocks(Metrics(), 32, 90) == 89
    assert cached_from_reused_blocks(None, 32, 200) == 0


def test_trtllm_engine_dir_reports_reused_blocks(trtllm_double):
    from test_trtllm_engine import TP1

    from tensorgate.executor.engines.trtllm_engine import TrtllmEngine, TrtllmSettings

    collector = CachedCollector()
    trtllm_double.TEST_DOUBLE.reused_blocks[500] = 2
    engine = TrtllmEngine(TP1, None, gpu_count=lambda: 8)
    engine.start(collector.emit)
    try:
        per_block = engine.stats().kv_block_size
        run(engine, collector, req(1, [500, *range(1, 100)]), req(2, [501, *range(1, 100)]))
    finally:
        engine.shutdown()
    sent = trtllm_double.TEST_DOUBLE.requests
    assert all(r.output_config.return_perf_metrics for r in sent[-2:])
    assert per_block > 0
    assert first_only(collector, 1) == 2 * per_block
    assert first_only(collector, 2) == 0
    # Reuse off: no metrics asked for, none reported.
    trtllm_double.TEST_DOUBLE.requests.clear()
    off = TrtllmEngine(TP1, TrtllmSettings(enable_kv_block_reuse=False), gpu_count=lambda: 8)
    off.start(collector.emit)
    try:
        run(off, collector, req(3, [500, *range(1, 100)]))
    finally:
        off.shutdown()
    assert not trtllm_double.TEST_DOUBLE.requests[-1].output_config.return_perf_metrics
    assert first_only(collector, 3) == 0


def test_llmapi_reports_reused_blocks(llmapi_double, tmp_path):
    from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 1000,
                    "max_position_embeddings": 512, "torch_dtype": "bfloat16"})
    )  # fmt: skip
    collector = CachedCollector()
    llmapi_double.TEST_DOUBLE.reused_blocks[500] = 3
    engine = TrtllmLlmApiEngine(ckpt, None, gpu_count=lambda: 8)
    engine.start(collector.emit)
    try:
        run(engine, collector, req(1, [500, *range(1, 200)]), req(2, [501, *range(1, 200)]))
    finally:
        engine.shutdown()
    per_block = llmapi_double.TEST_DOUBLE.tokens_per_block
    assert all(sp.return_perf_metrics for _, sp in llmapi_double.TEST_DOUBLE.requests[-2:])
    assert first_only(collector, 1) == 3 * per_block
    assert first_only(collector, 2) == 0
