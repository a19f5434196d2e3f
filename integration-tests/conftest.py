"""Starts the real server (launcher → executor → router) on the embedded model, once per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests

from tensorgate.v1 import executor_pb2, executor_pb2_grpc

STARTUP_TIMEOUT_S = 900  # first run converts the embedded model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    socket_path: Path | None
    proc: subprocess.Popen
    log_path: Path | None = None

    def stats(self) -> executor_pb2.StatsResponse:
        with grpc.insecure_channel(f"unix:{self.socket_path}") as ch:
            return executor_pb2_grpc.ExecutorStub(ch).Stats(executor_pb2.StatsRequest(), timeout=5)


def start_server(
    extra: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    default_socket: bool = False,
) -> tuple[subprocess.Popen, str, Path | None]:
    """Starts `tensorgate serve` on 127.0.0.1 in its own session. The executor's socket is put in
    a fresh directory of the test's unless `default_socket` (then the launcher picks it; None is
    returned for it)."""
    port = free_port()
    if default_socket:
        sock = None
        socket_args = []
    else:
        sock = Path(tempfile.mkdtemp(prefix="tg-it-")) / "executor.sock"
        socket_args = ["--executor-socket", str(sock)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorgate.cli",
            "serve",
            "--hostname",
            "127.0.0.1",
            "--port",
            str(port),
            *socket_args,
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}", sock


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log_path.read_text()}")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@contextmanager
def synthetic_server(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None, default_socket: bool = False
) -> Iterator[Server]:
    """A server on the synthetic engine (fixed cadence, no model), stopped on exit."""
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    proc, url, sock = start_server(
        ["--engine", "synthetic", *extra], log_path, env=env, default_socket=default_socket
    )
    try:
        wait_healthy(proc, url, log_path, 300)
        yield Server(url=url, socket_path=sock, proc=proc, log_path=log_path)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    proc, url, sock = start_server(["--max-batch-size", "16"], log_path)
    try:
        wait_healthy(proc, url, log_path, STARTUP_TIMEOUT_S)
        yield Server(url=url, socket_path=sock, proc=proc, log_path=log_path)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from tensorgate.models.embedded import ensure_embedded_model

    return ensure_embedded_model()


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address as /proc writes it, port) of every TCP socket `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                addr, port = parts[1].split(":")
                out.append((addr, int(port, 16)))
    return out
