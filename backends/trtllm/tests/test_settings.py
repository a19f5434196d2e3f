"""The executor's settings, declared once (tensorgate/executor/settings.py): `tensorgate serve`
and `python -m tensorgate.executor` accept and refuse the same values with the same message,
every executor flag can be set through `tensorgate serve` and arrives unchanged, and engines are
built from the typed, validated config."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from tensorgate import cli
from tensorgate.executor import __main__ as executor_main
from tensorgate.executor.settings import (
    EngineConfig,
    ExecutorSettings,
    SettingError,
    check_setting,
)
from tensorgate.launcher.model_source import ModelSource

# One value per setting, none of them the default: a new setting must be added here, which
# makes it part of the round trip below.
NOT_DEFAULT = {
    "device": "cuda:1",
    "dtype": "float16",
    "max_batch_size": 7,
    "max_input_tokens": 100,
    "max_total_tokens": 200,
    "max_num_tokens": 300,
    "kv_cache_blocks": 40,
    "block_size": 32,
    "iteration_ms": 2.5,
    "vocab_size": 1000,
    "synthetic_block_size": 32,
    "synthetic_cache_blocks": 100,
    "synthetic_prefill_us_per_token": 5.0,
    "kv_cache_free_gpu_memory_fraction": 0.5,
    "enable_kv_block_reuse": False,
    "capacity_scheduler_policy": "max_utilization",
    "tensor_parallel_size": 2,
    "pipeline_parallel_size": 2,
    "kv_event_buffer_size": 1024,
    "guided_decoding_backend": "xgrammar",
    "rl_hooks": True,
    "weight_version": "step-7",
    "port": 50051,
}

# What `tensorgate serve` resolves before handing it on, under its own names (serve, executor).
RESOLVED_BY_SERVE = {
    "--engine": "--engine",
    "--model-id": "--model-id",
    "--tokenizer-name": "--tokenizer-name",
    "--executor-socket": "--uds-path",
    "--json-output": "--json-output",
}

# The executor's own: serving a router on another host (TLS, shared secret). `tensorgate serve`
# runs its executors on this host, on unix sockets.
EXECUTOR_ONLY = {"--listen", "--tls-cert", "--tls-key"}

BAD = [
    (["--max-batch-size", "0"], "must be positive, got 0"),
    (["--max-input-tokens", "-3"], "must be positive, got -3"),
    (["--max-total-tokens", "1"], "must be at least 2, got 1"),
    (["--max-num-tokens", "0"], "must be positive"),
    (["--kv-cache-blocks", "0"], "must be positive"),
    (["--block-size", "2"], "must be at least 4"),
    (["--vocab-size", "1"], "must be at least 2"),
    (["--iteration-ms", "-1"], "must not be negative"),
    (["--dtype", "int8"], "must be one of auto, float32, bfloat16, float16; got 'int8'"),
    (["--device", "gpu"], "use cpu, cuda, cuda:N or auto"),
    (["--kv-cache-free-gpu-memory-fraction", "1.5"], "must be in (0, 1], got 1.5"),
    (["--capacity-scheduler-policy", "fifo"], "must be one of guaranteed_no_evict"),
    (["--max-batch-size", "many"], "expected an integer, got 'many'"),
    (["--weight-version", ""], "use 1 to 256 printable characters"),
]


def serve_namespace(argv: list[str]):
    return cli.build_parser().parse_args(["serve", *argv])


def executor_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        executor_main.parse_args(["--engine", "synthetic", "--uds-path", "/x.sock", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def serve_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        serve_namespace(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_not_default_covers_every_setting():
    fields = {f.name: f for f in dataclasses.fields(ExecutorSettings)}
    assert set(NOT_DEFAULT) == set(fields)
    assert all(NOT_DEFAULT[name] != f.default for name, f in fields.items())


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_both_command_lines_refuse_the_same_values_with_the_same_message(argv, message, capsys):
    from_executor = executor_error(argv, capsys)
    from_serve = serve_error(argv, capsys)
    assert message in from_executor
    assert from_executor.split("error: ", 1)[1] == from_serve.split("error: ", 1)[1]
    assert argv[0] in from_serve  # the message names the flag


def test_the_executor_port_is_checked_under_its_serve_name(capsys):
    assert "argument --executor-port: must be in [1, 65535], got 0" in serve_error(
        ["--executor-port", "0"], capsys
    )
    assert "argument --port: must be in [1, 65535], got 0" in executor_error(
        ["--port", "0"], capsys
    )


def test_every_executor_flag_can_be_set_through_serve():
    executor_flags = {
        flag
        for action in executor_main.build_parser()._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }
    sub = argparse.ArgumentParser().add_subparsers()
    cli.build_serve_parser(sub)
    serve_flags = {
        flag for action in sub.choices["serve"]._actions for flag in action.option_strings
    }
    handed_on = set(RESOLVED_BY_SERVE.values())
    for flag in executor_flags - handed_on - EXECUTOR_ONLY:
        serve_name = "--executor-port" if flag == "--port" else flag
        assert serve_name in serve_flags, f"{flag} cannot be set through tensorgate serve"
    assert set(RESOLVED_BY_SERVE) <= serve_flags


def _serve_argv(settings: dict) -> list[str]:
    argv = []
    for name, value in settings.items():
        flag = "--executor-port" if name == "port" else "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize("engine", ["synthetic", "trtllm"])
def test_serve_hands_every_setting_to_the_executor_unchanged(tmp_path, engine):
    a = serve_namespace(_serve_argv(NOT_DEFAULT))
    source = ModelSource(
        model_dir=tmp_path / "model", tokenizer_dir=tmp_path / "tok", engine=engine, model_id="m"
    )
    argv = cli._executor_args(a, source, tmp_path / "executor.sock")
    got = executor_main.parse_args(argv)
    assert got.config.settings == ExecutorSettings(**NOT_DEFAULT)
    assert got.config.engine == engine
    assert got.config.model_dir == tmp_path / "model"
    assert got.uds_path == tmp_path / "executor.sock"
    # The tokenizer directory is the trtllm engine's only (where its eos ids are).
    assert got.config.tokenizer_dir == (tmp_path / "tok" if engine == "trtllm" else None)


def test_serve_hands_on_nothing_that_was_not_given(tmp_path):
    source = ModelSource(tmp_path, tmp_path, "transformers", "m")
    argv = cli._executor_args(serve_namespace([]), source, tmp_path / "s.sock")
    assert argv == ["--engine", "transformers", "--model-id", str(tmp_path), "--uds-path",
                    str(tmp_path / "s.sock")]  # fmt: skip
    assert executor_main.parse_args(argv).config.settings == ExecutorSettings()


def test_settings_built_in_code_are_checked_too():
    with pytest.raises(SettingError, match=r"--max-batch-size must be positive, got 0"):
        ExecutorSettings(max_batch_size=0)
    with pytest.raises(SettingError, match=r"--dtype must be one of"):
        ExecutorSettings(dtype="fp8")
    with pytest.raises(SettingError, match=r"--max-batch-size must be int, got True"):
        ExecutorSettings(max_batch_size=True)
    with pytest.raises(SettingError, match=r"--block-size needs a value"):
        ExecutorSettings(block_size=None)
    with pytest.raises(SettingError, match=r"--engine must be one of"):
        EngineConfig("vllm")
    with pytest.raises(SettingError, match=r"in \(0, 1\]"):
        check_setting("kv_cache_free_gpu_memory_fraction", 0.0)
    assert ExecutorSettings(iteration_ms=5).iteration_ms == 5.0  # an int for a float is fine
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExecutorSettings().max_batch_size = 3  # type: ignore[misc]


def test_settings_an_engine_does_not_read_are_named():
    s = ExecutorSettings(device="cpu", max_batch_size=4, iteration_ms=5)
    assert s.unread_by("synthetic") == ["--device"]
    assert s.unread_by("transformers") == ["--iteration-ms"]
    assert s.unread_by("trtllm") == ["--device", "--iteration-ms"]
    assert ExecutorSettings().unread_by("trtllm") == []


def test_the_synthetic_engine_is_built_from_the_config():
    from tensorgate.executor.engines import load_engine

    settings = ExecutorSettings(max_batch_size=3, max_total_tokens=300, vocab_size=500)
    engine = load_engine(EngineConfig("synthetic", settings=settings))
    try:
        info = engine.info()
        assert info.vocab_size == 500
        assert (info.limits.max_batch_size, info.limits.max_total_tokens) == (3, 300)
        assert engine.period == pytest.approx(0.020)  # the declared default iteration_ms
    finally:
        engine.shutdown()


def test_engines_that_need_a_model_say_so():
    from tensorgate.executor.engine import EngineError
    from tensorgate.executor.engines.trtllm_engine import TrtllmEngine

    with pytest.raises(EngineError, match="needs --model-id"):
        TrtllmEngine.from_config(EngineConfig("trtllm", model_dir=None))


def test_docs_table_lists_every_serve_setting():
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    for name in NOT_DEFAULT:
        flag = "--executor-port" if name == "port" else "--" + name.replace("_", "-")
        assert f"`{flag}" in readme, f"README's configuration table lacks {flag}"
