"""Shared fixtures: a tiny random llama checkpoint (real transformers model, made locally)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tensorgate.v1 import executor_pb2 as pb

EOS = 5


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=EOS,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=EOS, bos_token_id=1).save_pretrained(path)
    return path


class Collector:
    """Gathers an engine's emitted iterations per request, as the server would."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.top: dict[int, list[pb.TopTokens]] = {}
        self.finish: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        # index of the emit that carried a request's first token
        self.first_batch: dict[int, int] = {}
        self.batches = 0
        self._cond = threading.Condition()

    def emit(self, batch: pb.IterationOutput) -> None:
        with self._cond:
            for o in batch.outputs:
                rid = o.request_id
                if o.token_ids and rid not in self.first_batch:
                    self.first_batch[rid] = self.batches
                self.tokens.setdefault(rid, []).extend(o.token_ids)
                self.logprobs.setdefault(rid, []).extend(o.logprobs)
                self.top.setdefault(rid, []).extend(o.top_tokens)
                if o.finish_reason:
                    assert rid not in self.finish, f"request {rid} finished twice"
                    self.finish[rid] = o.finish_reason
                    self.errors[rid] = o.error
            self.batches += 1
            self._cond.notify_all()

    def wait_finished(self, ids: list[int], timeout: float = 60) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: all(i in self.finish for i in ids), timeout)
        assert ok, f"requests {ids} did not finish; finished: {self.finish}"

    def wait_tokens(self, rid: int, n: int, timeout: float = 60) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.tokens.get(rid, [])) >= n, timeout)
        assert ok, f"request {rid} produced {len(self.tokens.get(rid, []))} < {n} tokens"


@pytest.fixture
def collector() -> Collector:
    return Collector()


# --- TensorRT-LLM: the TEST DOUBLE of its bindings and engine-directory fixtures -------------

TESTS_DIR = Path(__file__).parent
TRTLLM_DOUBLES = TESTS_DIR / "doubles"
TRTLLM_ENGINES = TESTS_DIR / "fixtures" / "trtllm_engines"


def _drop_tensorrt_llm_modules() -> None:
    import sys

    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def trtllm_double(monkeypatch: pytest.MonkeyPatch):
    """Puts the TEST DOUBLE of `tensorrt_llm` (tests/doubles, NOT TensorRT-LLM) into
    sys.modules for one test and yields its `tensorrt_llm.bindings.executor` module."""
    _drop_tensorrt_llm_modules()
    monkeypatch.syspath_prepend(str(TRTLLM_DOUBLES))
    import tensorrt_llm.bindings.executor as double

    assert double.IS_TEST_DOUBLE
    double.reset()
    yield double
    double.reset()
    _drop_tensorrt_llm_modules()


def make_trtllm_engine_dir(
    dest: Path, source: str = "llama-tp1-bf16", **build_config: object
) -> Path:
    """A copy of a fixture engine directory with some build_config fields replaced."""
    import json
    import shutil

    d = dest / source
    shutil.copytree(TRTLLM_ENGINES / source, d)
    if build_config:
        cfg = json.loads((d / "config.json").read_text())
        cfg["build_config"].update(build_config)
        (d / "config.json").write_text(json.dumps(cfg, indent=4))
    return d


@pytest.fixture
def llmapi_double(monkeypatch: pytest.MonkeyPatch):
    """Puts the TEST DOUBLE of `tensorrt_llm` (tests/doubles, NOT TensorRT-LLM) into
    sys.modules for one test and yields its LLM API module (`tensorrt_llm.llmapi.llm`)."""
    _drop_tensorrt_llm_modules()
    monkeypatch.syspath_prepend(str(TRTLLM_DOUBLES))
    import tensorrt_llm.llmapi.llm as double

    assert double.IS_TEST_DOUBLE
    double.reset()
    yield double
    double.reset()
    _drop_tensorrt_llm_modules()
