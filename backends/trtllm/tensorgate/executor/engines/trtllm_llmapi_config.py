"""What the LLM API flavour of the trtllm engine is built from: the Hugging Face checkpoint's
own facts (read without TensorRT-LLM) and the settings, turned into `tensorrt_llm.LLM(...)`
keywords and the limits tensorgate reports.

Every keyword is a TorchLlmArgs field of `tensorrt_llm/llmapi/llm_args.py` (`max_seq_len`,
`max_batch_size`, `max_num_tokens`, `pipeline_parallel_size`, `kv_cache_config`,
`enable_chunked_prefill`, `guided_decoding_backend` ("xgrammar" | "llguidance"),
`enable_iter_perf_stats`, `orchestrator_type`, `enable_sleep`) or an `LLM.__init__` argument
(`tensor_parallel_size`, `dtype`); `ray_worker_extension_cls` names
`tensorrt_llm.llmapi.rlhf_utils.WorkerExtension` as its docstring shows. The limits are the ones
passed, so Info and TensorRT-LLM agree on them by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tensorgate.executor.engine import EngineError, EngineLimits

DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_NUM_TOKENS = 8192
WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"


@dataclass(frozen=True)
class LlmApiSettings:
    """None: the checkpoint's (sequence length) or tensorgate's default (batch, step)."""

    max_batch_size: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_num_tokens: int | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9
    enable_kv_block_reuse: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_event_buffer_size: int = 0
    guided_decoding_backend: str = "none"
    rl_hooks: bool = False
    tokenizer_dir: Path | None = None


@dataclass(frozen=True)
class Checkpoint:
    """The facts of a Hugging Face checkpoint directory tensorgate needs."""

    path: Path
    architecture: str
    dtype: str
    vocab_size: int
    max_position_embeddings: int | None


def read_checkpoint(model_dir: Path) -> Checkpoint:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise EngineError(f"{model_dir} is not a directory: expected a Hugging Face checkpoint")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(
            f"{path}: cannot read the checkpoint's config ({e}); the trtllm engine serves a "
            "Hugging Face checkpoint directory (config.json + weights) or an engine directory"
        ) from None
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else {}
    vocab = data.get("vocab_size", text.get("vocab_size"))
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
        raise EngineError(f"{path}: vocab_size must be an integer of at least 2, got {vocab!r}")
    positions = data.get("max_position_embeddings", text.get("max_position_embeddings"))
    archs = data.get("architectures") or ["unknown"]
    dtype = data.get("torch_dtype") or data.get("dtype") or "auto"
    return Checkpoint(
        path=path,
        architecture=str(archs[0]),
        dtype=str(dtype),
        vocab_size=vocab,
        max_position_embeddings=positions if isinstance(positions, int) else None,
    )


def limits(ckpt: Checkpoint, s: LlmApiSettings) -> EngineLimits:
    total = s.max_total_tokens or ckpt.max_position_embeddings
    if total is None:
        raise EngineError(
            f"{ckpt.path} has no max_position_embeddings: pass --max-total-tokens to say how long "
            "a sequence may grow"
        )
    if total < 2:
        raise EngineError(f"the sequence length must be at least 2, got {total}")
    # Chunked prefill is always on (llm_kwargs): a prompt may then fill max_seq_len - 1, not
    # only one step's max_num_tokens (LLM._check_arguments checks max_num_tokens only without
    # it).
    max_input = total - 1
    if s.max_input_tokens is not None:
        if s.max_input_tokens > max_input:
            raise EngineError(
                f"--max-input-tokens {s.max_input_tokens} is larger than the sequence length "
                f"allows ({max_input} = {total} - 1)"
            )
        max_input = s.max_input_tokens
    return EngineLimits(
        max_batch_size=s.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_num_tokens=s.max_num_tokens or DEFAULT_MAX_NUM_TOKENS,
        max_top_n_tokens=0,
    )


def llm_kwargs(lim: EngineLimits, s: LlmApiSettings, kv_cache_config: object) -> dict:
    """`LLM(model, **llm_kwargs(...))` keywords (see the module docstring for each name)."""
    kw: dict[str, object] = {
        "max_seq_len": lim.max_total_tokens,
        "max_batch_size": lim.max_batch_size,
        "max_num_tokens": lim.max_num_tokens,
        "tensor_parallel_size": s.tensor_parallel_size,
        "pipeline_parallel_size": s.pipeline_parallel_size,
        "kv_cache_config": kv_cache_config,
        "enable_chunked_prefill": True,
        # Iteration stats carry the KV cache (kvCacheStats) and the queue: Info and Stats.
        "enable_iter_perf_stats": True,
    }
    if s.guided_decoding_backend != "none":
        kw["guided_decoding_backend"] = s.guided_decoding_backend
    if s.rl_hooks:
        # collective_rpc runs only on the Ray orchestrator (LLM._collective_rpc, AsyncLLM), and
        # the Ray worker's sleep/wakeup need enable_sleep (executor/ray_gpu_worker.py).
        kw["orchestrator_type"] = "ray"
        kw["ray_worker_extension_cls"] = WORKER_EXTENSION
        kw["enable_sleep"] = True
    return kw
