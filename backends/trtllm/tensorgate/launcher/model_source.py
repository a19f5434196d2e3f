"""Decides what to serve: which checkpoint or engine directory, which tokenizer, which engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelSourceError(Exception):
    """The model or tokenizer the user named cannot be served."""


@dataclass(frozen=True)
class ModelSource:
    model_dir: Path
    tokenizer_dir: Path
    engine: str
    model_id: str


def is_trtllm_engine_dir(path: Path) -> bool:
    """A TensorRT-LLM engine directory: config.json with build_config, and rank*.engine files."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return "build_config" in data or any(path.glob("rank*.engine"))


TRTLLM_EXECUTOR = "executor"
TRTLLM_LLMAPI = "llmapi"


def trtllm_flavour(path: Path) -> str:
    """Which TensorRT-LLM API serves `path` under `--engine trtllm`: an engine directory
    (trtllm-build output) runs on the executor API (`tensorrt_llm.bindings.executor`); anything
    else is taken as a Hugging Face checkpoint for the LLM API (`tensorrt_llm.LLM`, PyTorch
    backend), which loads it with no engine build."""
    return TRTLLM_EXECUTOR if is_trtllm_engine_dir(Path(path)) else TRTLLM_LLMAPI


def resolve(model_id: str | None, tokenizer_name: str | None, engine: str) -> ModelSource:
    if model_id is None:
        # Imported here: the embedded model's module pulls in nothing heavy until it converts.
        from tensorgate.models.embedded import ensure_embedded_model

        model_dir = ensure_embedded_model()
        name = "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)"
    else:
        model_dir = Path(model_id).expanduser()
        if not model_dir.is_dir():
            raise ModelSourceError(
                f"--model-id {model_id!r} is not a directory. tensorgate serves local checkpoints "
                "or TensorRT-LLM engine directories only; nothing is downloaded from a hub."
            )
        name = model_id

    if engine == "auto":
        engine = "trtllm" if is_trtllm_engine_dir(model_dir) else "transformers"

    tokenizer_dir = Path(tokenizer_name).expanduser() if tokenizer_name else model_dir
    tokenizer_file = tokenizer_dir if tokenizer_dir.is_file() else tokenizer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        hint = (
            " A TensorRT-LLM engine directory has no tokenizer: pass --tokenizer-name with the "
            "Hugging Face checkpoint directory it was built from."
            if engine == "trtllm" and trtllm_flavour(model_dir) == TRTLLM_EXECUTOR
            else ""
        )
        raise ModelSourceError(f"no tokenizer.json at {tokenizer_file}.{hint}")
    return ModelSource(
        model_dir=model_dir, tokenizer_dir=tokenizer_dir, engine=engine, model_id=name
    )
