"""The launcher's supervisor: restart of a dead or never-ready executor with its backoff, on a
fake clock and fake processes (exact, instant), and the process-level guarantees on real
processes: a stuck executor's whole process group is killed, and a child dies with a launcher
that is killed -9 (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensorgate.launcher import supervisor as sup_module
from tensorgate.launcher.backoff import RestartBackoff
from tensorgate.launcher.processes import Child
from tensorgate.launcher.supervisor import POLL_S, LaunchError, LaunchPlan, Supervisor

# The real one, before the autouse fixture below replaces it for the supervisor's tests.
REAL_ROUTER_ARGV = sup_module.router_argv

pytestmark = pytest.mark.timeout(60)

NEVER = float("inf")
RESTARTING = re.compile(r"the executor exited with code (-?\d+); restarting in (\d+)s")


class FakeClock:
    """Time moves only when the supervisor waits; every wait is recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self.stop_at = NEVER  # sets the supervisor's stop event at this time

    def monotonic(self) -> float:
        return self.now

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        if self.now >= self.stop_at:
            stop.set()
        return stop.is_set()

    def backoff_waits(self) -> list[float]:
        return [w for w in self.waits if w != POLL_S]


@dataclass
class Script:
    """How one fake process behaves, in seconds after its start."""

    ready_after: float = 0.0  # NEVER: alive but never ready
    exits_after: float = NEVER
    exit_code: int = 1


class FakeChild:
    _pids = itertools.count(1000)

    def __init__(self, name: str, clock: FakeClock, script: Script) -> None:
        self.name = name
        self.pid = next(self._pids)
        self.clock = clock
        self.script = script
        self.started_at = clock.now
        self.killed_at: float | None = None
        self.terminated = False

    def _age(self) -> float:
        return self.clock.now - self.started_at

    def poll(self) -> int | None:
        if self.killed_at is not None:
            return -signal.SIGKILL
        if self._age() >= self.script.exits_after:
            return self.script.exit_code
        return None

    def ready(self) -> bool:
        return self.poll() is None and self._age() >= self.script.ready_after

    def kill(self) -> int | None:
        if self.poll() is None:
            self.killed_at = self.clock.now
        return self.poll()

    def terminate(self, timeout: float) -> int | None:
        self.terminated = True
        return self.poll()

    def error_tail(self, lines: int = 15) -> str:
        return "fake executor stderr"


class FakeWorld:
    """A supervisor whose executors and router follow scripts, on a fake clock."""

    def __init__(self, executors: list[Script], router: Script, ready_timeout: float = 900.0):
        self.clock = FakeClock()
        self.scripts = list(executors)
        self.router_script = router
        self.executors: list[FakeChild] = []
        self.routers: list[FakeChild] = []
        plan = LaunchPlan(
            executor_args=["--engine", "synthetic", "--uds-path", "/nonexistent/executor.sock"],
            router_args=[],
            socket_path=Path("/nonexistent/executor.sock"),
            ready_timeout=ready_timeout,
        )
        self.supervisor = Supervisor(plan, spawn=self.spawn, probe=self.probe, clock=self.clock)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> FakeChild:
        if name == "router":
            child = FakeChild(name, self.clock, self.router_script)
            self.routers.append(child)
            return child
        assert self.scripts, "the supervisor started more executors than the test scripted"
        child = FakeChild(name, self.clock, self.scripts.pop(0))
        self.executors.append(child)
        return child

    def probe(self, socket_path: Path) -> tuple[bool, str]:
        executor = self.supervisor.executor
        assert isinstance(executor, FakeChild)
        return (True, "") if executor.ready() else (False, "loading")

    def run(self) -> int:
        return self.supervisor.run()


@pytest.fixture(autouse=True)
def _no_compiled_router(monkeypatch):
    # The router is a fake process: no need for the compiled module.
    monkeypatch.setattr(sup_module, "router_argv", lambda args: ["router", *args])
    # run() installs SIGINT/SIGTERM handlers; pytest's own come back afterwards.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# -- the backoff itself -------------------------------------------------------------------------


def test_backoff_doubles_from_1_s_to_30_s_and_resets():
    b = RestartBackoff()
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    b.reset()
    assert [b.next_delay() for _ in range(2)] == [1, 2]


def test_backoff_refuses_nonsense():
    with pytest.raises(ValueError):
        RestartBackoff(first_s=0)
    with pytest.raises(ValueError):
        RestartBackoff(first_s=40, max_s=30)


# -- the supervisor on a fake clock -------------------------------------------------------------


def test_a_restart_that_never_becomes_ready_is_killed_and_restarted(caplog):
    world = FakeWorld(
        executors=[
            Script(exits_after=10, exit_code=137),  # serves, then dies
            Script(ready_after=NEVER),  # restarted: alive, never ready
            Script(),  # the next restart is ready at once
        ],
        router=Script(exits_after=2000, exit_code=0),
        ready_timeout=900,
    )
    assert world.run() == 0
    _, stuck, good = world.executors
    # The stuck one was killed when its ready_timeout ran out (to the poll's resolution)...
    assert stuck.killed_at is not None
    assert stuck.killed_at - stuck.started_at == pytest.approx(900, abs=POLL_S)
    # ...and the next start came after the doubled delay, not never.
    assert world.clock.backoff_waits() == [1.0, 2.0]
    assert "the executor was not ready after 900s and was killed; restarting in 2s" in caplog.text
    assert good.started_at == pytest.approx(stuck.killed_at + 2.0)
    assert good.killed_at is None
    assert world.supervisor.executor is good
    assert len(world.routers) == 1  # the router stayed up throughout


def test_backoff_doubles_to_30_s_over_failed_starts_and_resets_after_a_good_one(caplog):
    failing = [Script(exits_after=0, exit_code=1) for _ in range(6)]  # exit before ready
    world = FakeWorld(
        executors=[
            Script(exits_after=5),
            *failing,
            Script(exits_after=100),  # ready: resets the backoff, then dies too
            Script(),
        ],
        router=Script(exits_after=1000, exit_code=0),
    )
    assert world.run() == 0
    assert world.clock.backoff_waits() == [1, 2, 4, 8, 16, 30, 30, 1]
    # Each restart is announced with the exit code and the delay, in the one form that
    # integration-tests/test_resilience.py reads from the launcher's log.
    announced = [RESTARTING.search(r.getMessage()) for r in caplog.records]
    assert [(m.group(1), float(m.group(2))) for m in announced if m] == [
        ("1", d) for d in (1, 2, 4, 8, 16, 30, 30, 1)
    ]
    assert len(world.executors) == 9
    starts = [e.started_at for e in world.executors[1:8]]
    # Each failed start is followed by the next one exactly one delay later.
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([2, 4, 8, 16, 30, 30])


def test_stopping_during_the_backoff_starts_nothing_more():
    world = FakeWorld(
        executors=[Script(exits_after=5)],
        router=Script(exits_after=NEVER),
    )
    world.clock.stop_at = 5.5  # SIGTERM in the middle of the 1 s restart delay
    assert world.run() == 0
    assert len(world.executors) == 1
    assert world.routers[0].terminated and world.executors[0].terminated


def test_without_restart_a_dead_executor_ends_the_service():
    world = FakeWorld(executors=[Script(exits_after=5)], router=Script(exits_after=NEVER))
    world.supervisor.plan.restart_executor = False
    assert world.run() == 1
    assert world.clock.backoff_waits() == []


def test_a_first_start_that_never_becomes_ready_is_a_launch_error():
    world = FakeWorld(executors=[Script(ready_after=NEVER)], router=Script(), ready_timeout=30)
    with pytest.raises(LaunchError, match=r"not ready after 30s \(loading\)"):
        world.run()
    assert world.routers == []
    assert world.executors[0].terminated


# -- real processes -------------------------------------------------------------------------------


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's new parent may not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        time.sleep(0.05)
    return False


def test_kill_takes_the_whole_process_group(tmp_path):
    """An executor under mpirun is a tree: killing only its root would leave ranks behind."""
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(g.pid))
        time.sleep(600)
        """
    )
    child = Child("executor", [sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child did not start its own child"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert not _dead(grandchild)
    assert child.kill() == -signal.SIGKILL
    assert _wait_dead(grandchild, 10), "the grandchild outlived the kill"


PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tensorgate.launcher import processes
    from tensorgate.launcher.supervisor import LaunchPlan, Supervisor

    if sys.argv[2] == "without-pdeathsig":  # the control: shows the test can fail
        processes._die_with_parent = lambda parent_pid: None
    sock = Path(sys.argv[1])
    plan = LaunchPlan(
        executor_args=["--engine", "synthetic", "--uds-path", str(sock)],
        router_args=[],
        socket_path=sock,
    )
    child = Supervisor(plan)._start_executor()
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("pdeathsig", [True, False])
def test_the_executor_dies_with_a_launcher_killed_by_sigkill(tmp_path, pdeathsig):
    sock = tmp_path / "executor.sock"
    mode = "with-pdeathsig" if pdeathsig else "without-pdeathsig"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(sock), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    executor = None
    try:
        assert parent.stdout is not None
        executor = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not sock.exists():  # serving: past loading, in its steady state
            assert time.monotonic() < deadline, "the executor did not start serving"
            assert not _dead(executor), "the executor exited on its own"
            time.sleep(0.05)
        parent.kill()  # SIGKILL: no handler of the launcher runs
        parent.wait()
        if pdeathsig:
            assert _wait_dead(executor, 20), "the executor outlived its SIGKILLed launcher"
        else:
            assert not _wait_dead(executor, 2), "the control: without PDEATHSIG it lives on"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if executor is not None and not _dead(executor):
            os.kill(executor, signal.SIGKILL)


def test_the_executor_does_not_inherit_the_api_key(monkeypatch):
    from tensorgate.launcher.supervisor import executor_env

    monkeypatch.setenv("TENSORGATE_API_KEY", "s3cret")
    monkeypatch.setenv("KEEP_ME", "1")
    env = executor_env(None)
    assert "TENSORGATE_API_KEY" not in env and env["KEEP_ME"] == "1"
    assert executor_env({"TENSORGATE_API_KEY": "x", "A": "b"}) == {"A": "b"}


def test_router_binary_from_the_environment_replaces_the_module(monkeypatch, tmp_path):
    """TENSORGATE_ROUTER_BINARY runs another router build (one with symbols, for perf)."""
    binary = tmp_path / "tensorgate-router"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("TENSORGATE_ROUTER_BINARY", str(binary))
    assert REAL_ROUTER_ARGV(["--port", "1"]) == [str(binary), "--port", "1"]
    binary.chmod(0o644)
    with pytest.raises(LaunchError, match="not an executable"):
        REAL_ROUTER_ARGV([])
