"""The `config.json` of a TensorRT-LLM engine directory, read without TensorRT-LLM.

`trtllm-build` (and `optimum-cli export trtllm`) write one `config.json` next to the
`rank<N>.engine` files. Its shape comes from TensorRT-LLM's `tensorrt_llm/builder.py`
(`EngineConfig.to_dict`: `version`, `pretrained_config`, `build_config`), `BuildConfig` (same
file: `max_batch_size`, `max_input_len`, `max_seq_len`, `max_num_tokens`, `max_beam_width`,
`plugin_config.tokens_per_block`) and `tensorrt_llm/mapping.py` (`Mapping.to_dict`:
`world_size`, `tp_size`, `pp_size`, `gpus_per_node`).

The prompt limit is the executor's, not `build_config.max_input_len`: TensorRT-LLM's
`cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp` (the TrtGptModelInflightBatching
constructor) sets maxInputLen to `max_seq_len - 1` when chunked context is on, to
`min(max_seq_len - 1, max_num_tokens)` when context FMHA and packed input (remove_input_padding)
are on, and to `build_config.max_input_len` otherwise; `LlmRequest::validate`
(`cpp/tensorrt_llm/batch_manager/llmRequest.cpp`) refuses a longer prompt.

This module reads only what tensorgate needs, checks it, and turns it into EngineLimits. Every
error names the file and the field, so a broken or foreign directory fails at load with a
message rather than deep inside the engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tensorgate.executor.engine import EngineError, EngineLimits

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class EngineMapping:
    """How the engine is split over GPUs (`pretrained_config.mapping`)."""

    world_size: int
    tp_size: int
    pp_size: int
    gpus_per_node: int


@dataclass(frozen=True)
class TrtllmEngineConfig:
    """The parts of an engine's config.json that tensorgate uses."""

    path: Path
    version: str
    architecture: str
    dtype: str
    vocab_size: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_beam_width: int
    tokens_per_block: int | None
    mapping: EngineMapping
    # plugin_config flags that decide the executor's prompt limit and whether chunked context
    # can run (executorImpl.cpp checkOptionalParams turns chunked context off, with only a
    # warning, unless paged context FMHA is on).
    context_fmha: bool = True
    remove_input_padding: bool = True
    paged_context_fmha: bool = False
    # build_config.gather_context_logits: the engine outputs the logits of every prompt position,
    # which OutputConfig(return_context_logits=True) needs (executorImpl.cpp fetchNewRequests
    # fails the request otherwise: "Return context logit need to build engine with
    # gather_context_logits"); prompt log probabilities are computed from them.
    gather_context_logits: bool = False

    @property
    def engine_dir(self) -> Path:
        return self.path.parent

    def engine_files(self) -> list[Path]:
        return [self.engine_dir / f"rank{r}.engine" for r in range(self.mapping.world_size)]

    def executor_max_input_len(self, chunked_context: bool) -> int:
        """The executor's own prompt limit (trtGptModelInflightBatching.cpp, see above)."""
        if chunked_context:
            return self.max_seq_len - 1
        if self.context_fmha and self.remove_input_padding:
            return min(self.max_seq_len - 1, self.max_num_tokens)
        return self.max_input_len

    def limits(
        self, overrides: LimitOverrides | None = None, *, chunked_context: bool = False
    ) -> EngineLimits:
        """The engine's limits, tightened (never widened) by the CLI overrides."""
        o = overrides or LimitOverrides()
        batch = _tighten("--max-batch-size", o.max_batch_size, self.max_batch_size, self)
        total = _tighten("--max-total-tokens", o.max_total_tokens, self.max_seq_len, self)
        # The engine refuses a prompt that leaves no room for one generated token.
        max_input = min(self.executor_max_input_len(chunked_context), total - 1)
        max_input = _tighten("--max-input-tokens", o.max_input_tokens, max_input, self)
        return EngineLimits(
            max_batch_size=batch,
            max_input_tokens=max_input,
            max_total_tokens=total,
            max_num_tokens=self.max_num_tokens,
            # The executor's Result carries the chosen token's log probability only.
            max_top_n_tokens=0,
        )


@dataclass(frozen=True)
class LimitOverrides:
    max_batch_size: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None


def _tighten(flag: str, asked: int | None, engine: int, cfg: TrtllmEngineConfig) -> int:
    if asked is None:
        return engine
    if asked > engine:
        raise EngineError(
            f"{flag} {asked} is larger than the engine allows ({engine}, from {cfg.path}); "
            "rebuild the engine with a larger limit (scripts/build-engine) or lower the flag"
        )
    return asked


class _Reader:
    """Typed access to the JSON with errors that name the file and the field."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    def _fail(self, field: str, what: str) -> EngineError:
        return EngineError(f"{self.path}: {field} {what}")

    def section(self, name: str) -> dict:
        value = self.data.get(name)
        if not isinstance(value, dict):
            raise self._fail(
                name,
                "is missing or not an object: this is not a TensorRT-LLM engine config.json "
                "(build one with scripts/build-engine or trtllm-build)",
            )
        return value

    def integer(self, section: dict, dotted: str, *, minimum: int = 1) -> int:
        value = section.get(dotted.rsplit(".", 1)[-1])
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(dotted, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self._fail(dotted, f"must be at least {minimum}, got {value}")
        return value

    def optional_integer(self, section: dict, dotted: str) -> int | None:
        if section.get(dotted.rsplit(".", 1)[-1]) is None:
            return None
        return self.integer(section, dotted)

    def string(self, section: dict, dotted: str) -> str:
        value = section.get(dotted.rsplit(".", 1)[-1])
        if not isinstance(value, str) or not value:
            raise self._fail(dotted, f"must be a non-empty string, got {value!r}")
        return value


def load_engine_config(engine_dir: Path) -> TrtllmEngineConfig:
    """Reads and checks `<engine_dir>/config.json`; raises EngineError naming the problem."""
    engine_dir = Path(engine_dir)
    path = engine_dir / CONFIG_NAME
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir} is not a directory: expected a TensorRT-LLM engine dir")
    if not path.is_file():
        raise EngineError(
            f"{path} does not exist: a TensorRT-LLM engine directory holds the config.json "
            "written by trtllm-build next to its rank<N>.engine files"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: cannot read it: {e}") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path}: the top level must be a JSON object")
    r = _Reader(path, data)
    pretrained = r.section("pretrained_config")
    build = r.section("build_config")

    mapping_raw = pretrained.get("mapping")
    if not isinstance(mapping_raw, dict):
        raise r._fail("pretrained_config.mapping", "is missing or not an object")
    tp = r.integer(mapping_raw, "pretrained_config.mapping.tp_size")
    pp = r.integer(mapping_raw, "pretrained_config.mapping.pp_size")
    world = r.optional_integer(mapping_raw, "pretrained_config.mapping.world_size") or tp * pp
    cp = r.optional_integer(mapping_raw, "pretrained_config.mapping.cp_size") or 1
    if world != tp * pp * cp:
        raise r._fail(
            "pretrained_config.mapping.world_size",
            f"is {world} but tp_size*pp_size*cp_size is {tp}*{pp}*{cp}={tp * pp * cp}",
        )
    gpus_per_node = r.optional_integer(mapping_raw, "pretrained_config.mapping.gpus_per_node")
    mapping = EngineMapping(
        world_size=world, tp_size=tp, pp_size=pp, gpus_per_node=gpus_per_node or 8
    )

    quant = pretrained.get("quantization") or {}
    if not isinstance(quant, dict):
        raise r._fail("pretrained_config.quantization", "must be an object")
    plugin = build.get("plugin_config") or {}
    if not isinstance(plugin, dict):
        raise r._fail("build_config.plugin_config", "must be an object")

    max_input_len = r.integer(build, "build_config.max_input_len")
    # Older builds wrote max_output_len instead of max_seq_len.
    max_seq_len = r.optional_integer(build, "build_config.max_seq_len")
    if max_seq_len is None:
        max_output_len = r.optional_integer(build, "build_config.max_output_len")
        if max_output_len is None:
            raise r._fail("build_config.max_seq_len", "is missing (and so is max_output_len)")
        max_seq_len = max_input_len + max_output_len
    if max_seq_len < 2:
        raise r._fail("build_config.max_seq_len", f"must be at least 2, got {max_seq_len}")
    max_beam_width = r.integer(build, "build_config.max_beam_width")
    cfg = TrtllmEngineConfig(
        path=path,
        version=str(data.get("version", "unknown")),
        architecture=r.string(pretrained, "pretrained_config.architecture"),
        dtype=r.string(pretrained, "pretrained_config.dtype"),
        vocab_size=r.integer(pretrained, "pretrained_config.vocab_size"),
        quant_algo=_optional_str(quant.get("quant_algo")),
        kv_cache_quant_algo=_optional_str(quant.get("kv_cache_quant_algo")),
        max_batch_size=r.integer(build, "build_config.max_batch_size"),
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=r.integer(build, "build_config.max_num_tokens"),
        max_beam_width=max_beam_width,
        tokens_per_block=r.optional_integer(plugin, "build_config.plugin_config.tokens_per_block"),
        mapping=mapping,
        # An absent flag: context_fmha and remove_input_padding as trtllm-build's defaults (on);
        # paged context FMHA off, so that chunked context is never assumed without it.
        context_fmha=plugin.get("context_fmha", True) is True,
        remove_input_padding=plugin.get("remove_input_padding", True) is True,
        paged_context_fmha=plugin.get("use_paged_context_fmha", False) is True,
        gather_context_logits=build.get("gather_context_logits", False) is True,
    )
    missing = [p.name for p in cfg.engine_files() if not p.is_file()]
    if missing:
        raise EngineError(
            f"{engine_dir}: config.json describes {world} rank(s) (tp_size {tp}, pp_size {pp}) "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
        )
    return cfg


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def visible_gpu_count(env: dict[str, str] | None = None) -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the driver's list.

    It never initialises CUDA (a CUDA context in the launcher or before MPI starts its ranks
    causes trouble), so it reads /proc/driver/nvidia/gpus, the driver's own list.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        # CUDA stops at the first invalid entry ("-1" or "NoDevFiles" hide every GPU).
        count = 0
        for d in ids:
            if d.startswith("-") or d == "NoDevFiles":
                break
            count += 1
        return count
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        return sum(1 for _ in gpus.iterdir())
    except OSError:
        return 0


def check_gpus(
    cfg: TrtllmEngineConfig,
    gpu_count: Callable[[], int] = visible_gpu_count,
    env: dict[str, str] | None = None,
) -> int:
    """Fails unless this machine shows at least the engine's world size in GPUs (more is
    fine: TensorRT-LLM uses the first world_size of them)."""
    env = dict(os.environ) if env is None else env
    n = gpu_count()
    world = cfg.mapping.world_size
    if n < world:
        where = (
            f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}"
            if "CUDA_VISIBLE_DEVICES" in env
            else "the NVIDIA driver"
        )
        raise EngineError(
            f"the engine in {cfg.engine_dir} was built for world_size {world} (tp_size "
            f"{cfg.mapping.tp_size}, pp_size {cfg.mapping.pp_size}, from {cfg.path}) but "
            f"{where} shows {n} GPU(s); run it on {world} GPU(s) or rebuild it with "
            "scripts/build-engine --tp-size/--pp-size"
        )
    return n
