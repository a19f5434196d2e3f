"""Runs executor and router: readiness, restart of a dead executor with backoff, draining."""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

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
    """The Rust router, run from the compiled module that `pip install` built."""
    try:
        import tensorgate._router  # noqa: F401
    except ImportError as e:
        raise LaunchError(
            f"the compiled router module is missing ({e}); install tensorgate with "
            "`pip install .`, which builds it"
        ) from e
    return python_module_argv("tensorgate.router", args)


def wait_ready(
    socket_path: Path, child: Child, timeout: float, stop: threading.Event | None = None
) -> None:
    """Polls Health until ready; fails fast with the executor's error if it exits."""
    deadline = time.monotonic() + timeout
    target = f"unix:{socket_path}"
    last_reason = "starting"
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise LaunchError("interrupted while waiting for the executor")
        code = child.poll()
        if code is not None:
            raise LaunchError(
                f"the executor exited with code {code} before it was ready:\n{child.error_tail()}"
            )
        if socket_path.exists():
            try:
                with grpc.insecure_channel(target) as channel:
                    stub = executor_pb2_grpc.ExecutorStub(channel)
                    reply = stub.Health(executor_pb2.HealthRequest(), timeout=2)
                if reply.ready:
                    return
                last_reason = reply.reason or "not ready"
            except grpc.RpcError as e:
                last_reason = e.details() or str(e.code())
        time.sleep(0.2)
    raise LaunchError(f"the executor was not ready after {timeout:.0f}s ({last_reason})")


class Supervisor:
    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.stopping = threading.Event()
        self.executor: Child | None = None
        self.router: Child | None = None

    def _start_executor(self) -> Child:
        self.plan.socket_path.unlink(missing_ok=True)
        try:
            cmd = trtllm_command(self.plan.executor_args)
        except TrtllmLaunchError as e:
            raise LaunchError(str(e)) from None
        if cmd is not None:  # TensorRT-LLM: plain for world_size 1, mpirun -n N for TP/PP
            return Child("executor", cmd.argv, env=cmd.env)
        argv = python_module_argv("tensorgate.executor", self.plan.executor_args)
        return Child("executor", argv)

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
            wait_ready(self.plan.socket_path, self.executor, self.plan.ready_timeout, self.stopping)
        except LaunchError:
            if self.stopping.is_set():
                return 0
            raise
        self.router = Child("router", router_argv(self.plan.router_args), self.plan.router_env)
        backoff = 1.0
        while not self.stopping.wait(0.2):
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
            log.error("the executor exited with code %d; restarting in %.0fs", code, backoff)
            if self.stopping.wait(backoff):
                break
            backoff = min(backoff * 2, 30.0)
            self.executor = self._start_executor()
            try:
                wait_ready(
                    self.plan.socket_path, self.executor, self.plan.ready_timeout, self.stopping
                )
                log.info("executor restarted (pid %d)", self.executor.pid)
                backoff = 1.0
            except LaunchError as e:
                log.error("executor restart failed: %s", e)
        return 0

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
