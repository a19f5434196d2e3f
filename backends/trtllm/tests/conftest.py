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
    """Gathers an engine's emitted outputs per request, as the server would."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.batches = 0
        self._cond = threading.Condition()

    def emit(self, outputs: list[pb.RequestOutput]) -> None:
        with self._cond:
            self.batches += 1
            for o in outputs:
                self.tokens.setdefault(o.request_id, []).extend(o.token_ids)
                if o.finish_reason:
                    self.finish[o.request_id] = o.finish_reason
                    self.errors[o.request_id] = o.error
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
