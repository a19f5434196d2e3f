"""Runs the executors and the router: readiness of every executor before the router starts,
restart of a dead executor with its own backoff (each executor of a data-parallel pool on its
own, while the others serve), draining."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from tensorgate.launcher.backoff import RestartBackoff
from tensorgate.launcher.processes import Child, python_module_argv
from tensorgate.launcher.trtllm_launch import TrtllmLaunchError, trtllm_command
from tensorgate.v1 import executor_pb2, executor_pb2_grpc

log = logging.getLogger("tensorgate.launcher")


class LaunchError(Exception):
    """The server could not be started; the message is for the user."""


@dataclass(frozen=True)
class ExecutorLaunch:
    """One executor: its arguments, its socket, and what its environment gets on top of the
    launcher's (CUDA_VISIBLE_DEVICES of a data-parallel pool)."""

    args: list[str]
    socket_path: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchPlan:
    # Executor 0 (the only one unless data parallel).
    executor_args: list[str]
    router_args: list[str]
    socket_path: Path
    ready_timeout: float = 900.0
    shutdown_timeout: float = 30.0
    restart_executor: bool = True
    owned_dirs: list[Path] = field(default_factory=list)
    router_env: dict[str, str] | None = None
    executor_env: dict[str, str] = field(default_factory=dict)
    # Executors 1..N-1 of a data-parallel pool.
    more_executors: list[ExecutorLaunch] = field(default_factory=list)

    def executors(self) -> list[ExecutorLaunch]:
        first = ExecutorLaunch(self.executor_args, self.socket_path, self.executor_env)
        return [first, *self.more_executors]


def default_socket_path() -> tuple[Path, Path]:
    """A socket in a fresh 0700 directory: only this user can reach the executor."""
    d = Path(tempfile.mkdtemp(prefix="tensorgate-"))
    return d / "executor.sock", d


def router_argv(args: list[str]) -> list[str]:
    """The Rust router, run from the compiled module that `pip install` built, or the
    standalone binary named by TENSORGATE_ROUTER_BINARY (a build with symbols, for profiling:
    the module in the wheel is stripped)."""
    binary = os.environ.get("TENSORGATE_ROUTER_BINARY")
    if binary:
        if not os.access(binary, os.X_OK):
            raise LaunchError(f"TENSORGATE_ROUTER_BINARY={binary} is not an executable file")
        return [binary, *args]
    try:
        import tensorgate._router  # noqa: F401
    except ImportError as e:
        raise LaunchError(
            f"the compiled router module is missing ({e}); install tensorgate with "
            "`pip install .`, which builds it"
        ) from e
    return python_module_argv("tensorgate.router", args)


class Clock(Protocol):
    """Time as the supervisor sees it; tests give it a fake one so that waits take no time."""

    def monotonic(self) -> float: ...

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Sleeps `seconds`, or less if `stop` is set; returns whether it is set."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(seconds)


# One Health call to the executor on its socket: (ready, why not).
HealthProbe = Callable[[Path], tuple[bool, str]]
# Starts a child process: (name, argv, env) -> Child.
Spawn = Callable[[str, list[str], dict[str, str] | None], Child]

POLL_S = 0.2


def probe_health(socket_path: Path) -> tuple[bool, str]:
    if not socket_path.exists():
        return False, "starting"
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = executor_pb2_grpc.ExecutorStub(channel)
            reply = stub.Health(executor_pb2.HealthRequest(), timeout=2)
    except grpc.RpcError as e:
        return False, e.details() or str(e.code())
    return reply.ready, reply.reason or ("" if reply.ready else "not ready")


def executor_env(base: dict[str, str] | None) -> dict[str, str]:
    """The executor's environment: the launcher's, less the router's keys (the executor
    serves no HTTP and has no use for them)."""
    env = dict(os.environ if base is None else base)
    env.pop("TENSORGATE_API_KEY", None)
    env.pop("TENSORGATE_RL_CONTROL_KEY", None)
    return env


class _Slot:
    """One supervised executor: started, running (ready), or waiting to be started again."""

    STARTING, RUNNING, WAITING = "starting", "running", "waiting"

    def __init__(self, launch: ExecutorLaunch, label: str) -> None:
        self.launch = launch
        self.label = label  # "the executor", or "executor i" in a pool
        self.backoff = RestartBackoff()
        self.child: Child | None = None
        self.state = self.STARTING
        self.deadline = 0.0  # STARTING: ready by then; WAITING: start again then
        self.reason = "starting"  # the last Health answer while not ready


class Supervisor:
    def __init__(
        self,
        plan: LaunchPlan,
        *,
        spawn: Spawn = Child,
        probe: HealthProbe = probe_health,
        clock: Clock | None = None,
    ):
        self.plan = plan
        self.stopping = threading.Event()
        self.router: Child | None = None
        launches = plan.executors()
        single = len(launches) == 1
        self.slots = [
            _Slot(launch, "the executor" if single else f"executor {i}")
            for i, launch in enumerate(launches)
        ]
        self._spawn = spawn
        self._probe = probe
        self._clock = clock or SystemClock()

    @property
    def executor(self) -> Child | None:
        """Executor 0's current process."""
        return self.slots[0].child

    @property
    def backoff(self) -> RestartBackoff:
        return self.slots[0].backoff

    def _start_executor(self, launch: ExecutorLaunch | None = None) -> Child:
        launch = launch or self.slots[0].launch
        launch.socket_path.unlink(missing_ok=True)
        base = {**os.environ, **launch.env}
        try:
            cmd = trtllm_command(launch.args, env=base)
        except TrtllmLaunchError as e:
            raise LaunchError(str(e)) from None
        if cmd is not None:  # TensorRT-LLM: plain for world_size 1, mpirun -n N for TP/PP
            return self._spawn("executor", cmd.argv, executor_env(cmd.env))
        argv = python_module_argv("tensorgate.executor", launch.args)
        return self._spawn("executor", argv, executor_env(base))

    def _start(self, slot: _Slot) -> None:
        slot.child = self._start_executor(slot.launch)
        slot.state = _Slot.STARTING
        slot.deadline = self._clock.monotonic() + self.plan.ready_timeout
        slot.reason = "starting"

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            return self._run()
        finally:
            self._stop_all()

    def _run(self) -> int:
        # Every child is started from this (the main) thread: see processes._die_with_parent.
        for slot in self.slots:
            self._start(slot)
        pids = ", ".join(str(s.child.pid) for s in self.slots if s.child is not None)
        if len(self.slots) == 1:
            log.info("waiting for the executor (pid %s) to load the model", pids)
        else:
            log.info("waiting for %d executors (pids %s) to load the model", len(self.slots), pids)
        try:
            self._wait_all_ready()
        except LaunchError:
            if self.stopping.is_set():
                return 0
            raise
        self.router = self._spawn(
            "router", router_argv(self.plan.router_args), self.plan.router_env
        )
        while not self._clock.wait(self.stopping, self._next_wait()):
            code = self.router.poll()
            if code is not None:
                if code != 0:
                    log.error("the router exited with code %d", code)
                return code
            for slot in self.slots:
                if not self._tend(slot):
                    return 1
        return 0

    def _wait_all_ready(self) -> None:
        """Polls every executor's Health until all are ready; fails fast with an executor's
        error if one exits, or when one is not ready within ready_timeout."""
        deadline = self._clock.monotonic() + self.plan.ready_timeout
        while self._clock.monotonic() < deadline:
            if self.stopping.is_set():
                raise LaunchError("interrupted while waiting for the executors")
            for slot in self.slots:
                if slot.state == _Slot.RUNNING:
                    continue
                assert slot.child is not None
                code = slot.child.poll()
                if code is not None:
                    raise LaunchError(
                        f"{slot.label} exited with code {code} before it was ready:\n"
                        f"{slot.child.error_tail()}"
                    )
                ready, reason = self._probe(slot.launch.socket_path)
                if ready:
                    slot.state = _Slot.RUNNING
                else:
                    slot.reason = reason
            if all(s.state == _Slot.RUNNING for s in self.slots):
                return
            self._clock.wait(self.stopping, POLL_S)
        late = next(s for s in self.slots if s.state != _Slot.RUNNING)
        raise LaunchError(
            f"{late.label} was not ready after {self.plan.ready_timeout:.0f}s ({late.reason})"
        )

    def _next_wait(self) -> float:
        """POLL_S while an executor runs or starts (each is watched); otherwise, when every
        one waits out its backoff, until the first of them is due."""
        now = self._clock.monotonic()
        # To the microsecond: a delay of 8 s is waited as 8 s, not 7.999999999999998.
        due = [round(s.deadline - now, 6) for s in self.slots if s.state == _Slot.WAITING]
        if len(due) == len(self.slots):
            return max(min(due), 0.0)
        return min([POLL_S, *(d for d in due if d > 0)])

    def _tend(self, slot: _Slot) -> bool:
        """One look at an executor: notices its death, starts it again when its delay is
        over, and checks a start's readiness. False when a dead executor ends the service
        (restart_executor off)."""
        now = self._clock.monotonic()
        if slot.state == _Slot.RUNNING:
            assert slot.child is not None
            code = slot.child.poll()
            if code is None:
                return True
            if not self.plan.restart_executor:
                log.error("%s exited with code %d", slot.label, code)
                return False
            self._wait_to_restart(slot, f"{slot.label} exited with code {code}")
            return True
        if slot.state == _Slot.WAITING:
            if round(slot.deadline - now, 6) > 0:  # as _next_wait counts it
                return True
            self._start(slot)
        self._check_start(slot)
        return True

    def _check_start(self, slot: _Slot) -> None:
        """A restart is a failed start if it exits, or stays alive but is not ready within
        ready_timeout: it is killed with its process group, and the next start waits longer.
        Otherwise the router would keep a dead worker for as long as that one lives."""
        assert slot.child is not None
        code = slot.child.poll()
        if code is None:
            ready, reason = self._probe(slot.launch.socket_path)
            if ready:
                log.info("%s restarted (pid %d)", slot.label, slot.child.pid)
                slot.state = _Slot.RUNNING
                slot.backoff.reset()
                return
            slot.reason = reason
            if self._clock.monotonic() < slot.deadline:
                return
            log.error(
                "%s restart failed: not ready after %.0fs (%s)",
                slot.label,
                self.plan.ready_timeout,
                reason,
            )
            slot.child.kill()
            why = f"{slot.label} was not ready after {self.plan.ready_timeout:.0f}s and was killed"
        else:
            log.error("%s restart failed: it exited with code %d", slot.label, code)
            # Also when it exited: what it started may still run.
            slot.child.kill()
            why = f"{slot.label} exited with code {code}"
        self._wait_to_restart(slot, why)

    def _wait_to_restart(self, slot: _Slot, why: str) -> None:
        delay = slot.backoff.next_delay()
        # This form ("... exited with code N; restarting in Ns") is what
        # integration-tests/test_resilience.py reads from the launcher's log.
        log.error("%s; restarting in %.0fs", why, delay)
        slot.state = _Slot.WAITING
        slot.deadline = self._clock.monotonic() + delay

    def _stop_all(self) -> None:
        # Router first: it drains HTTP while the executors can still finish tokens.
        if self.router is not None:
            # The router drains for shutdown_timeout itself; the margin covers its exit.
            self.router.terminate(self.plan.shutdown_timeout + 5)
        children = [s.child for s in self.slots if s.child is not None]
        if len(children) == 1:
            children[0].terminate(self.plan.shutdown_timeout)
        elif children:
            # Together: each may take shutdown_timeout, and they stop independently.
            with ThreadPoolExecutor(len(children)) as pool:
                list(pool.map(lambda c: c.terminate(self.plan.shutdown_timeout), children))
        for slot in self.slots:
            slot.launch.socket_path.unlink(missing_ok=True)
        for d in self.plan.owned_dirs:
            shutil.rmtree(d, ignore_errors=True)
