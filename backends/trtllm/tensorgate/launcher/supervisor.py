"""Runs executor and router: readiness, restart of a dead executor with backoff, draining."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
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


@dataclass
class LaunchPlan:
    executor_args: list[str]
    router_args: list[str]
    socket_path: Path
    ready_timeout: float = 900.0
    shutdown_timeout: float = 30.0
    restart_executor: bool = True
    owned_dirs: list[Path] = field(default_factory=list)
    router_env: dict[str, str] | None = None


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


def wait_ready(
    socket_path: Path,
    child: Child,
    timeout: float,
    stop: threading.Event,
    *,
    probe: HealthProbe = probe_health,
    clock: Clock | None = None,
) -> None:
    """Polls Health until ready; fails fast with the executor's error if it exits."""
    clock = clock or SystemClock()
    deadline = clock.monotonic() + timeout
    last_reason = "starting"
    while clock.monotonic() < deadline:
        if stop.is_set():
            raise LaunchError("interrupted while waiting for the executor")
        code = child.poll()
        if code is not None:
            raise LaunchError(
                f"the executor exited with code {code} before it was ready:\n{child.error_tail()}"
            )
        ready, reason = probe(socket_path)
        if ready:
            return
        last_reason = reason
        clock.wait(stop, POLL_S)
    raise LaunchError(f"the executor was not ready after {timeout:.0f}s ({last_reason})")


def executor_env(base: dict[str, str] | None) -> dict[str, str]:
    """The executor's environment: the launcher's, less the router's keys (the executor
    serves no HTTP and has no use for them)."""
    env = dict(os.environ if base is None else base)
    env.pop("TENSORGATE_API_KEY", None)
    env.pop("TENSORGATE_RL_CONTROL_KEY", None)
    return env


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
        self.executor: Child | None = None
        self.router: Child | None = None
        self.backoff = RestartBackoff()
        self._spawn = spawn
        self._probe = probe
        self._clock = clock or SystemClock()

    def _start_executor(self) -> Child:
        self.plan.socket_path.unlink(missing_ok=True)
        try:
            cmd = trtllm_command(self.plan.executor_args)
        except TrtllmLaunchError as e:
            raise LaunchError(str(e)) from None
        if cmd is not None:  # TensorRT-LLM: plain for world_size 1, mpirun -n N for TP/PP
            return self._spawn("executor", cmd.argv, executor_env(cmd.env))
        argv = python_module_argv("tensorgate.executor", self.plan.executor_args)
        return self._spawn("executor", argv, executor_env(None))

    def _wait_ready(self, child: Child) -> None:
        wait_ready(
            self.plan.socket_path,
            child,
            self.plan.ready_timeout,
            self.stopping,
            probe=self._probe,
            clock=self._clock,
        )

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
        self.executor = self._start_executor()
        log.info("waiting for the executor (pid %d) to load the model", self.executor.pid)
        try:
            self._wait_ready(self.executor)
        except LaunchError:
            if self.stopping.is_set():
                return 0
            raise
        self.router = self._spawn(
            "router", router_argv(self.plan.router_args), self.plan.router_env
        )
        while not self._clock.wait(self.stopping, POLL_S):
            code = self.router.poll()
            if code is not None:
                if code != 0:
                    log.error("the router exited with code %d", code)
                return code
            code = self.executor.poll()
            if code is None:
                continue
            if not self.plan.restart_executor:
                log.error("the executor exited with code %d", code)
                return 1
            if not self._restart_executor(f"the executor exited with code {code}"):
                break
        return 0

    def _restart_executor(self, why: str) -> bool:
        """Starts executors, each after the backoff's delay, until one is ready. A start that
        exits, or stays alive but is not ready within ready_timeout, is a failed start: it is
        killed with its process group, and the next waits longer. Otherwise the router would
        answer 503 for as long as that one lives. False when stopping; True when an executor is
        ready, or the router exited (which the caller reports)."""
        assert self.router is not None
        while True:
            delay = self.backoff.next_delay()
            log.error("%s; restarting in %.0fs", why, delay)
            if self._clock.wait(self.stopping, delay):
                return False
            if self.router.poll() is not None:
                return True
            self.executor = self._start_executor()
            try:
                self._wait_ready(self.executor)
            except LaunchError as e:
                if self.stopping.is_set():
                    return False  # _stop_all stops it, gracefully
                log.error("executor restart failed: %s", e)
                code = self.executor.poll()
                # Also when it exited: what it started may still run.
                self.executor.kill()
                if code is None:
                    why = (
                        f"the executor was not ready after {self.plan.ready_timeout:.0f}s "
                        "and was killed"
                    )
                else:
                    why = f"the executor exited with code {code}"
                continue
            log.info("executor restarted (pid %d)", self.executor.pid)
            self.backoff.reset()
            return True

    def _stop_all(self) -> None:
        # Router first: it drains HTTP while the executor can still finish tokens.
        if self.router is not None:
            # The router drains for shutdown_timeout itself; the margin covers its exit.
            self.router.terminate(self.plan.shutdown_timeout + 5)
        if self.executor is not None:
            self.executor.terminate(self.plan.shutdown_timeout)
        self.plan.socket_path.unlink(missing_ok=True)
        for d in self.plan.owned_dirs:
            shutil.rmtree(d, ignore_errors=True)
