"""`tensorgate serve`'s rollout-control flags: checked before a model is loaded, handed to the
router, and the control key passed by environment only (never on a command line)."""

from __future__ import annotations

import pytest

from tensorgate import cli
from tensorgate.launcher.model_source import ModelSource
from tensorgate.launcher.supervisor import executor_env


def serve_namespace(argv: list[str], monkeypatch) -> object:
    monkeypatch.delenv("TENSORGATE_RL_CONTROL_KEY", raising=False)
    monkeypatch.delenv("TENSORGATE_API_KEY", raising=False)
    return cli.build_parser().parse_args(["serve", *argv])


def router_argv(a, tmp_path) -> list[str]:
    source = ModelSource(tmp_path, tmp_path, "synthetic", "m")
    return cli._router_args(a, source, [tmp_path / "s.sock"])


def test_off_by_default_and_nothing_is_handed_on(tmp_path, monkeypatch):
    a = serve_namespace([], monkeypatch)
    assert cli.rl_control_error(a) is None
    argv = router_argv(a, tmp_path)
    assert not any(arg.startswith("--rl") or arg == "--enable-rl-control" for arg in argv)
    monkeypatch.setenv("TENSORGATE_RL_CONTROL_KEY", "stray")
    assert "TENSORGATE_RL_CONTROL_KEY" not in cli.router_env(a), "off: the key is not handed on"


def test_the_flags_reach_the_router_and_the_key_only_its_environment(tmp_path, monkeypatch):
    key = "ctl-4b1d"
    a = serve_namespace(
        ["--enable-rl-control", "--rl-control-key", key, "--rl-max-payload-bytes", "4096"],
        monkeypatch,
    )
    assert cli.rl_control_error(a) is None
    argv = router_argv(a, tmp_path)
    assert "--enable-rl-control" in argv
    assert argv[argv.index("--rl-max-payload-bytes") + 1] == "4096"
    assert not any(key in arg for arg in argv), argv
    assert cli.router_env(a)["TENSORGATE_RL_CONTROL_KEY"] == key
    monkeypatch.setenv("TENSORGATE_RL_CONTROL_KEY", key)
    assert "TENSORGATE_RL_CONTROL_KEY" not in executor_env(None)


def test_the_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TENSORGATE_RL_CONTROL_KEY", "from-env")
    a = cli.build_parser().parse_args(["serve", "--enable-rl-control"])
    assert cli.rl_control_error(a) is None
    assert cli.router_env(a)["TENSORGATE_RL_CONTROL_KEY"] == "from-env"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--enable-rl-control"], "--rl-control-key"),
        (["--enable-rl-control", "--rl-control-key", " "], "TENSORGATE_RL_CONTROL_KEY"),
        (
            ["--enable-rl-control", "--rl-control-key", "k", "--api-key", "k"],
            "must differ from --api-key",
        ),
        (
            ["--enable-rl-control", "--rl-control-key", "k", "--rl-max-payload-bytes", "0"],
            "--rl-max-payload-bytes must be at least 1",
        ),
    ],
)
def test_unusable_settings_are_refused_naming_the_flag(argv, says, monkeypatch):
    a = serve_namespace(argv, monkeypatch)
    problem = cli.rl_control_error(a)
    assert problem is not None and says in problem, problem


def test_serve_refuses_before_loading_anything(monkeypatch, capsys):
    monkeypatch.delenv("TENSORGATE_RL_CONTROL_KEY", raising=False)
    # A model id that does not exist: were the flags not checked first, this would fail later
    # and differently.
    code = cli.main(["serve", "--enable-rl-control", "--model-id", "/nonexistent/model"])
    assert code == 2
    assert "--rl-control-key" in capsys.readouterr().err
