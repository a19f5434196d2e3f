"""`tensorgate serve --data-parallel-size N`: the plan (each executor's argv, socket and GPUs; the
router's argv), and the supervisor of a pool: every executor ready before the router starts, a
dead one restarted on its own while the others serve (fake clock; then real executor processes)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from test_supervisor import NEVER, FakeChild, FakeClock, Script

from tensorgate import cli
from tensorgate.launcher import supervisor as sup_module
from tensorgate.launcher.data_parallel import DataParallelError, visible_gpus
from tensorgate.launcher.model_source import ModelSource
from tensorgate.launcher.supervisor import (
    POLL_S,
    ExecutorLaunch,
    LaunchError,
    LaunchPlan,
    Supervisor,
    probe_health,
)

pytestmark = pytest.mark.timeout(120)

SYNTHETIC = ModelSource(Path("/m"), Path("/tok"), "synthetic", "synthetic")
TRANSFORMERS = ModelSource(Path("/m"), Path("/tok"), "transformers", "/m")
FOUR_GPUS = ["0", "1", "2", "3"]


def plan(*flags: str, source=SYNTHETIC, gpus=(), tmp: Path = Path("/run/tg")) -> LaunchPlan:
    a = cli.build_parser().parse_args(["serve", *flags])
    return cli.launch_plan(a, source, lambda: (tmp / "executor.sock", tmp), gpus=list(gpus))


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, x in enumerate(argv) if x == flag]


# -- the plan ------------------------------------------------------------------------------------


def test_one_executor_keeps_the_argv_of_before():
    p = plan(source=TRANSFORMERS, gpus=FOUR_GPUS)
    (only,) = p.executors()
    assert only.socket_path == Path("/run/tg/executor.sock")
    assert flag_values(only.args, "--uds-path") == ["/run/tg/executor.sock"]
    assert only.env == {}  # every visible GPU, as before
    assert flag_values(p.router_args, "--executor-socket") == ["/run/tg/executor.sock"]
    for absent in ("--executor", "--routing", "--migration-limit"):
        assert absent not in p.router_args
    assert p.owned_dirs == [Path("/run/tg")]


def test_one_executor_passes_routing_flags_only_when_given():
    p = plan("--routing", "round-robin")
    assert flag_values(p.router_args, "--routing") == ["round-robin"]
    assert "--migration-limit" not in p.router_args
    p = plan("--migration-limit", "0")
    assert flag_values(p.router_args, "--migration-limit") == ["0"]
    assert "--routing" not in p.router_args


def test_a_pool_has_a_socket_each_and_the_router_one_executor_url_each():
    p = plan("--data-parallel-size", "3")
    executors = p.executors()
    sockets = [e.socket_path for e in executors]
    assert sockets == [Path(f"/run/tg/executor-{i}.sock") for i in range(3)]
    for e in executors:
        assert flag_values(e.args, "--uds-path") == [str(e.socket_path)]
        assert flag_values(e.args, "--engine") == ["synthetic"]
        assert e.env == {}  # synthetic: no GPU
    assert "--executor-socket" not in p.router_args
    assert flag_values(p.router_args, "--executor") == [f"unix://{s}" for s in sockets]
    # A pool gets the policy and the migration limit, at their defaults.
    assert flag_values(p.router_args, "--routing") == ["kv-aware"]
    assert flag_values(p.router_args, "--migration-limit") == ["3"]
    p = plan("--data-parallel-size", "2", "--routing", "least-load", "--migration-limit", "1")
    assert flag_values(p.router_args, "--routing") == ["least-load"]
    assert flag_values(p.router_args, "--migration-limit") == ["1"]


def test_a_given_socket_names_the_pools_sockets(tmp_path):
    p = plan("--data-parallel-size", "2", "--executor-socket", str(tmp_path / "gate.sock"))
    assert [e.socket_path for e in p.executors()] == [
        tmp_path / "gate-0.sock",
        tmp_path / "gate-1.sock",
    ]
    assert p.owned_dirs == []  # the user's directory is not removed


def test_each_executor_gets_its_own_gpus_on_cuda():
    p = plan("--data-parallel-size", "2", source=TRANSFORMERS, gpus=FOUR_GPUS)
    assert [e.env for e in p.executors()] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
    ]
    p = plan(
        "--data-parallel-size", "2", "--gpus-per-executor", "2",
        source=TRANSFORMERS, gpus=["GPU-a", "GPU-b", "GPU-c", "GPU-d"],
    )  # fmt: skip
    assert [e.env["CUDA_VISIBLE_DEVICES"] for e in p.executors()] == ["GPU-a,GPU-b", "GPU-c,GPU-d"]
    # One executor given --gpus-per-executor takes that many, not all.
    (only,) = plan("--gpus-per-executor", "2", source=TRANSFORMERS, gpus=FOUR_GPUS).executors()
    assert only.env == {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_more_gpus_than_visible_is_a_clear_error():
    with pytest.raises(DataParallelError) as e:
        plan("--data-parallel-size", "3", "--gpus-per-executor", "2",
             source=TRANSFORMERS, gpus=FOUR_GPUS)  # fmt: skip
    assert "--data-parallel-size 3 x --gpus-per-executor 2 needs 6 GPU(s)" in str(e.value)
    assert "shows 4" in str(e.value)


def test_on_the_cpu_executors_share_it():
    for flags in (("--device", "cpu"), ()):
        gpus = FOUR_GPUS if flags else []  # --device cpu, or no GPU at all
        p = plan("--data-parallel-size", "4", *flags, source=TRANSFORMERS, gpus=gpus)
        assert [e.env for e in p.executors()] == [{}] * 4


def test_a_device_naming_one_gpu_cannot_be_split():
    with pytest.raises(DataParallelError, match="--device cuda:1 names one GPU"):
        plan("--data-parallel-size", "2", "--device", "cuda:1", source=TRANSFORMERS,
             gpus=FOUR_GPUS)  # fmt: skip


def test_the_loopback_port_serves_one_executor_only():
    with pytest.raises(DataParallelError, match="--executor-port cannot serve 2 executors"):
        plan("--data-parallel-size", "2", "--executor-port", "5000")


@pytest.mark.parametrize(
    "flags",
    [
        ("--data-parallel-size", "0"),
        ("--gpus-per-executor", "0"),
        ("--migration-limit", "-1"),
        ("--routing", "random"),
        ("--data-parallel-size", "two"),
    ],
)
def test_bad_values_are_refused_by_the_parser(flags, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", *flags])
    assert flags[0] in capsys.readouterr().err


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    # CUDA stops at the first invalid entry.
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, count=lambda: 2) == ["0", "1"]


def test_the_serve_command_refuses_a_bad_layout_before_starting_anything(monkeypatch, capsys):
    monkeypatch.setattr(
        "tensorgate.launcher.model_source.resolve", lambda *args: TRANSFORMERS, raising=True
    )
    monkeypatch.setattr(cli, "visible_gpus", lambda: ["0"])

    def no_supervisor(*args, **kwargs):
        raise AssertionError("nothing is started")

    monkeypatch.setattr(sup_module, "Supervisor", no_supervisor)
    assert cli.main(["serve", "--data-parallel-size", "2", "--engine", "transformers"]) == 2
    assert "needs 2 GPU(s)" in capsys.readouterr().err


# -- the supervisor of a pool, on a fake clock ---------------------------------------------------


class FakePool:
    """Executors on sockets e0..eN-1 following scripts (a list per socket, used in turn)."""

    def __init__(self, scripts: list[list[Script]], router: Script, ready_timeout: float = 900):
        self.clock = FakeClock()
        self.scripts = [list(s) for s in scripts]
        self.started: list[list[FakeChild]] = [[] for _ in scripts]
        self.routers: list[FakeChild] = []
        self.router_script = router
        self.spawn_envs: list[dict[str, str] | None] = []
        launches = [
            ExecutorLaunch(["--uds-path", f"/nonexistent/e{i}"], Path(f"/nonexistent/e{i}"),
                           {"CUDA_VISIBLE_DEVICES": str(i)})
            for i in range(len(scripts))
        ]  # fmt: skip
        p = LaunchPlan(
            executor_args=launches[0].args,
            router_args=[],
            socket_path=launches[0].socket_path,
            ready_timeout=ready_timeout,
            executor_env=launches[0].env,
            more_executors=launches[1:],
        )
        self.supervisor = Supervisor(p, spawn=self.spawn, probe=self.probe, clock=self.clock)

    def spawn(self, name, argv, env):
        if name == "router":
            child = FakeChild(name, self.clock, self.router_script)
            self.routers.append(child)
            return child
        i = int(argv[argv.index("--uds-path") + 1].removeprefix("/nonexistent/e"))
        assert self.scripts[i], f"executor {i} started more often than scripted"
        child = FakeChild(name, self.clock, self.scripts[i].pop(0))
        self.started[i].append(child)
        self.spawn_envs.append(env)
        return child

    def probe(self, socket_path: Path) -> tuple[bool, str]:
        i = int(str(socket_path).removeprefix("/nonexistent/e"))
        return (True, "") if self.started[i][-1].ready() else (False, "loading")


@pytest.fixture(autouse=True)
def _fake_router_and_signals(monkeypatch):
    monkeypatch.setattr(sup_module, "router_argv", lambda args: ["router", *args])
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_router_starts_once_every_executor_is_ready():
    pool = FakePool(
        [[Script(ready_after=5)], [Script(ready_after=30)]],
        router=Script(exits_after=100, exit_code=0),
    )
    assert pool.supervisor.run() == 0
    (router,) = pool.routers
    assert router.started_at == pytest.approx(30, abs=POLL_S)
    # Each executor's own GPUs reach its environment.
    assert [env["CUDA_VISIBLE_DEVICES"] for env in pool.spawn_envs] == ["0", "1"]


def test_one_executor_not_ready_is_a_launch_error_naming_it():
    pool = FakePool([[Script()], [Script(ready_after=NEVER)]], router=Script(), ready_timeout=30)
    with pytest.raises(LaunchError, match=r"executor 1 was not ready after 30s \(loading\)"):
        pool.supervisor.run()
    assert pool.routers == []
    assert all(c.terminated for c in pool.started[0] + pool.started[1])


def test_a_dead_executor_restarts_on_its_own_while_the_others_serve(caplog):
    pool = FakePool(
        [
            [Script()],  # serves throughout
            [Script(exits_after=10, exit_code=137), Script(exits_after=0), Script(ready_after=3)],
        ],
        router=Script(exits_after=100, exit_code=0),
    )
    assert pool.supervisor.run() == 0
    (steady,) = pool.started[0]
    first, failed, good = pool.started[1]
    assert steady.killed_at is None  # started once, never touched
    # Its own backoff: 1 s after the death, then 2 s after the failed start.
    assert failed.started_at == pytest.approx(first.started_at + 10 + 1, abs=POLL_S)
    assert good.started_at == pytest.approx(failed.started_at + 2, abs=POLL_S)
    assert "executor 1 exited with code 137; restarting in 1s" in caplog.text
    assert "executor 1 exited with code 1; restarting in 2s" in caplog.text
    assert "executor 1 restarted" in caplog.text
    assert "executor 0" not in caplog.text
    assert len(pool.routers) == 1  # the router stayed up
    # While executor 1 waited out its backoff, executor 0 was still watched every POLL_S.
    assert max(pool.clock.waits) <= POLL_S


def test_two_executors_dying_keep_separate_backoffs(caplog):
    pool = FakePool(
        [
            [Script(exits_after=10), Script(exits_after=0), Script()],
            [Script(exits_after=10.5), Script()],
        ],
        router=Script(exits_after=100, exit_code=0),
    )
    assert pool.supervisor.run() == 0
    restarts = [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]
    assert restarts == [
        "executor 0 exited with code 1; restarting in 1s",
        "executor 1 exited with code 1; restarting in 1s",  # not 2 s: its own backoff
        "executor 0 exited with code 1; restarting in 2s",
    ]


# -- real processes: two synthetic executors, one killed -----------------------------------------


def test_a_killed_executor_of_a_real_pool_is_restarted_and_the_other_untouched(
    tmp_path, monkeypatch
):
    release = tmp_path / "router-may-exit"
    # The router is a stand-in that exits when the test says so (the real one needs the
    # router's --executor flag; `tensorgate serve --data-parallel-size 2` end to end is the
    # integration tests').
    router = [sys.executable, "-c",
              "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)",
              str(release)]  # fmt: skip
    monkeypatch.setattr(sup_module, "router_argv", lambda args: router)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    a = cli.build_parser().parse_args(
        ["serve", "--engine", "synthetic", "--data-parallel-size", "2",
         "--executor-socket", str(tmp_path / "e.sock"), "--iteration-ms", "5"]
    )  # fmt: skip
    p = cli.launch_plan(a, SYNTHETIC, lambda: None, gpus=[])
    p.ready_timeout = 60
    supervisor = Supervisor(p)
    seen: dict[str, object] = {}

    def drive() -> None:
        try:
            deadline = time.monotonic() + 60
            while supervisor.router is None:
                assert time.monotonic() < deadline, "the pool did not become ready"
                time.sleep(0.05)
            sockets = [e.socket_path for e in p.executors()]
            seen["ready"] = [probe_health(s)[0] for s in sockets]
            keep, victim = (s.child.pid for s in supervisor.slots)
            os.killpg(victim, signal.SIGKILL)
            while True:
                assert time.monotonic() < deadline, "executor 1 was not restarted"
                child = supervisor.slots[1].child
                if child.pid != victim and probe_health(sockets[1])[0]:
                    break
                time.sleep(0.1)
            seen["kept"] = supervisor.slots[0].child.pid == keep
            seen["restarted"] = child.pid
        except BaseException as e:  # reported by the test, after the supervisor stops
            seen["error"] = e
        finally:
            release.write_text("")

    driver = threading.Thread(target=drive)
    driver.start()
    assert supervisor.run() == 0
    driver.join(timeout=30)
    assert "error" not in seen, seen.get("error")
    assert seen["ready"] == [True, True]
    assert seen["kept"] is True
    assert not any(e.socket_path.exists() for e in p.executors())  # removed at the end
