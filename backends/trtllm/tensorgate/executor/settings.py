"""Every executor setting, declared once: name, type, default, bounds, choices and help.

Both command lines are built from these declarations (`python -m tensorgate.executor` and
`tensorgate serve`, which hands them on to the executor), so the two accept and refuse the same
values with the same messages. Engines are built from the frozen, validated `EngineConfig`,
never from an argparse namespace.

Not declared here: what to serve and where (`--engine`, `--model-id`, `--tokenizer-name`, the
socket), which `tensorgate serve` resolves first and hands to the executor resolved; and the
router's own settings (router/src/config.rs).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINE_NAMES = ("transformers", "trtllm", "synthetic")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CAPACITY_SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
GUIDED_DECODING_BACKENDS = ("none", "xgrammar", "llguidance")

DEFAULT_ITERATION_MS = 20.0
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_BLOCK_SIZE = 64
DEFAULT_FREE_GPU_MEMORY_FRACTION = 0.9
DEFAULT_KV_BLOCK_REUSE = True
DEFAULT_CAPACITY_SCHEDULER_POLICY = "guaranteed_no_evict"
# The synthetic engine's prefix-cache model (engines/synthetic_prefix_cache.py).
DEFAULT_SYNTHETIC_BLOCK_SIZE = 16
DEFAULT_SYNTHETIC_CACHE_BLOCKS = 4096
# 1000 uncached prompt tokens cost one default iteration (20 ms).
DEFAULT_SYNTHETIC_PREFILL_US_PER_TOKEN = 20.0


class SettingError(ValueError):
    """A setting outside its type, bounds or choices; the message names the flag."""


@dataclass(frozen=True)
class Spec:
    """What a setting's dataclass field does not say by itself."""

    help: str
    engines: tuple[str, ...] = ENGINE_NAMES  # the engines that read it
    choices: tuple[str, ...] | None = None
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None  # inclusive
    pattern: str | None = None  # a full match, for strings
    pattern_help: str = ""
    # Its name on `tensorgate serve`, where the executor's would mean something else there.
    serve_flag: str | None = None


def _setting(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(help=help, **spec)})


@dataclass(frozen=True)
class ExecutorSettings:
    """How the executor runs its engine. None: the engine decides (from the model, the engine
    directory or the device). Validated on construction."""

    device: str = _setting(
        "auto",
        "cpu, cuda, cuda:N or auto (CUDA when available)",
        engines=("transformers",),
        pattern=r"auto|cpu|cuda(:[0-9]+)?",
        pattern_help="use cpu, cuda, cuda:N or auto",
    )
    dtype: str = _setting(
        "auto",
        "weights' dtype (auto: float32 on CPU, bfloat16 on CUDA)",
        engines=("transformers",),
        choices=DTYPES,
    )
    max_batch_size: int | None = _setting(None, "most requests the engine runs at once", minimum=1)
    max_input_tokens: int | None = _setting(None, "most prompt tokens per request", minimum=1)
    max_total_tokens: int | None = _setting(
        None, "most prompt + generated tokens per request", minimum=2
    )
    max_num_tokens: int | None = _setting(
        None,
        "tokens per engine step (the prefill budget; trtllm: checkpoints only)",
        engines=("transformers", "trtllm"),
        minimum=1,
    )
    kv_cache_blocks: int | None = _setting(
        None, "KV cache size in blocks of --block-size tokens", engines=("transformers",), minimum=1
    )
    block_size: int = _setting(
        DEFAULT_BLOCK_SIZE, "tokens per KV cache block", engines=("transformers",), minimum=4
    )
    iteration_ms: float = _setting(
        DEFAULT_ITERATION_MS, "time per engine iteration", engines=("synthetic",), minimum=0
    )
    vocab_size: int = _setting(
        DEFAULT_VOCAB_SIZE, "vocabulary size", engines=("synthetic",), minimum=2
    )
    synthetic_block_size: int = _setting(
        DEFAULT_SYNTHETIC_BLOCK_SIZE,
        "tokens per block of the prefix-cache model",
        engines=("synthetic",),
        minimum=1,
    )
    synthetic_cache_blocks: int = _setting(
        DEFAULT_SYNTHETIC_CACHE_BLOCKS,
        "blocks the prefix-cache model keeps (least recently used evicted)",
        engines=("synthetic",),
        minimum=1,
    )
    synthetic_prefill_us_per_token: float = _setting(
        DEFAULT_SYNTHETIC_PREFILL_US_PER_TOKEN,
        "microseconds of prefill per uncached prompt token, added to the iteration a request joins",
        engines=("synthetic",),
        minimum=0,
    )
    kv_cache_free_gpu_memory_fraction: float = _setting(
        DEFAULT_FREE_GPU_MEMORY_FRACTION,
        "share of the GPU memory left after the weights that the KV cache takes",
        engines=("trtllm",),
        above=0,
        maximum=1,
    )
    enable_kv_block_reuse: bool = _setting(
        DEFAULT_KV_BLOCK_REUSE,
        "KV cache prefix reuse across requests, and the KV-cache events KV-aware routing reads "
        "(trtllm: those also need --kv-event-buffer-size)",
    )
    capacity_scheduler_policy: str = _setting(
        DEFAULT_CAPACITY_SCHEDULER_POLICY,
        "how requests are admitted into the running batch",
        engines=("trtllm",),
        choices=CAPACITY_SCHEDULER_POLICIES,
    )
    # The trtllm engine's LLM API flavour (a Hugging Face checkpoint, no engine build): what an
    # engine directory fixes at build time is chosen here.
    tensor_parallel_size: int = _setting(
        1, "GPUs per pipeline stage (checkpoints only)", engines=("trtllm",), minimum=1
    )
    pipeline_parallel_size: int = _setting(
        1, "pipeline stages (checkpoints only)", engines=("trtllm",), minimum=1
    )
    kv_event_buffer_size: int = _setting(
        0,
        "KV-cache events kept for KV-aware routing (checkpoints only; 0: none)",
        engines=("trtllm",),
        minimum=0,
    )
    guided_decoding_backend: str = _setting(
        "none",
        "TensorRT-LLM's grammar backend for structured output (checkpoints only)",
        engines=("trtllm",),
        choices=GUIDED_DECODING_BACKENDS,
    )
    rl_hooks: bool = _setting(
        False,
        "run on TensorRT-LLM's Ray orchestrator with its RL worker extension, for "
        "sleep/wakeup/update_weights (checkpoints only)",
        engines=("trtllm",),
    )
    weight_version: str = _setting(
        "0",
        "label of the weights loaded at start; every final output carries the label of the "
        "weights that produced it (rollout-control updates set new ones)",
        pattern=r"[^\x00-\x1f\x7f]{1,256}",
        pattern_help="use 1 to 256 printable characters",
    )
    port: int | None = _setting(
        None,
        "also serve gRPC on 127.0.0.1:PORT, loopback only (default: the unix socket only)",
        minimum=1,
        maximum=65535,
        serve_flag="--executor-port",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, *, serve: bool = False) -> ExecutorSettings:
        """The settings given on a command line built by `add_arguments`; absent ones keep
        their defaults."""
        given = {}
        for f in dataclasses.fields(cls):
            value = getattr(ns, _dest(f, serve))
            if value is not None:
                given[f.name] = value
        return cls(**given)

    def to_argv(self) -> list[str]:
        """The executor's flags for every setting that is not at its default."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            flag = _flag(f, serve=False)
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag.removeprefix("--"))
            else:
                argv += [flag, str(value)]
        return argv

    def unread_by(self, engine: str) -> list[str]:
        """Flags set away from their default that `engine` does not read."""
        return [
            _flag(f, serve=False)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default and engine not in _spec(f).engines
        ]


@dataclass(frozen=True)
class EngineConfig:
    """What an engine is built from: which engine, over what, with which settings."""

    engine: str
    model_dir: Path | None = None
    # trtllm: where generation_config.json (eos and pad ids) is, when not in the engine dir.
    tokenizer_dir: Path | None = None
    settings: ExecutorSettings = field(default_factory=ExecutorSettings)

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_NAMES:
            raise SettingError(
                f"--engine must be one of {', '.join(ENGINE_NAMES)}; got {self.engine!r}"
            )


def check_setting(name: str, value: object) -> None:
    """Raises SettingError if `value` is not valid for the setting `name`."""
    f = _FIELDS[name]
    _coerce(f, value)


def add_arguments(parser: argparse.ArgumentParser, *, serve: bool = False) -> None:
    """One flag per setting. Absent flags parse as None (the setting keeps its default), so
    that `tensorgate serve` hands on only what was given."""
    for f in dataclasses.fields(ExecutorSettings):
        spec = _spec(f)
        kind = _base_type(f)
        help = spec.help
        if spec.engines != ENGINE_NAMES:
            help = f"{' and '.join(spec.engines)} engine: {help}"
        if f.default is not None:
            shown = str(f.default).lower() if kind is bool else f.default
            help += f" (default: {shown})"
        kwargs: dict[str, Any] = {"dest": _dest(f, serve), "default": None, "help": help}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = functools.partial(_parse, f)
            kwargs["metavar"] = "{" + ",".join(spec.choices) + "}" if spec.choices else None
        parser.add_argument(_flag(f, serve), **kwargs)


# -- the declarations, read back -----------------------------------------------------------------


def _spec(f: dataclasses.Field) -> Spec:
    return f.metadata["spec"]


def _flag(f: dataclasses.Field, serve: bool) -> str:
    spec = _spec(f)
    if serve and spec.serve_flag:
        return spec.serve_flag
    return "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field, serve: bool) -> str:
    return _flag(f, serve).removeprefix("--").replace("-", "_")


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(ExecutorSettings)


def _base_type(f: dataclasses.Field) -> type:
    """int for `int | None`, and so on."""
    hint = _hints()[f.name]
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _parse(f: dataclasses.Field, text: str) -> object:
    """argparse's `type`: the value, or the same message the dataclass would give."""
    kind = _base_type(f)
    try:
        value = kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    try:
        return _coerce(f, value)
    except SettingError as e:
        # argparse names the flag itself.
        raise argparse.ArgumentTypeError(str(e).removeprefix(_flag(f, False) + " ")) from None


def _coerce(f: dataclasses.Field, value: object) -> object:
    """The value, checked against its declaration (an int for a float setting becomes a
    float); SettingError if it does not fit."""
    flag = _flag(f, serve=False)
    spec = _spec(f)
    kind = _base_type(f)
    if value is None:
        if f.default is None:
            return None
        raise SettingError(f"{flag} needs a value")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingError(f"{flag} must be {kind.__name__}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise SettingError(f"{flag} must be one of {', '.join(spec.choices)}; got {value!r}")
    if spec.pattern is not None and not re.fullmatch(spec.pattern, str(value)):
        raise SettingError(f"{flag} {value!r}: {spec.pattern_help}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_bounds(flag, spec, value)
    return value


def _check_bounds(flag: str, spec: Spec, value: float) -> None:
    low_ok = (spec.minimum is None or value >= spec.minimum) and (
        spec.above is None or value > spec.above
    )
    high_ok = spec.maximum is None or value <= spec.maximum
    if low_ok and high_ok:
        return
    if spec.above is not None and spec.maximum is not None:
        raise SettingError(f"{flag} must be in ({spec.above:g}, {spec.maximum:g}], got {value}")
    if spec.minimum is not None and spec.maximum is not None:
        raise SettingError(f"{flag} must be in [{spec.minimum:g}, {spec.maximum:g}], got {value}")
    if spec.minimum == 1:
        raise SettingError(f"{flag} must be positive, got {value}")
    if spec.minimum == 0:
        raise SettingError(f"{flag} must not be negative, got {value}")
    if spec.minimum is not None:
        raise SettingError(f"{flag} must be at least {spec.minimum:g}, got {value}")
    raise SettingError(f"{flag} must be more than {spec.above:g}, got {value}")


_FIELDS = {f.name: f for f in dataclasses.fields(ExecutorSettings)}
