"""Many executors behind one router, as real processes: synthetic executors on unix sockets and
the router started on their `--executor` URLs. Shared by the fleet tests and the benchmark."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import requests
from conftest import free_port
from conftest import stop as stop_process

from tensorgate.v1 import executor_pb2, executor_pb2_grpc

# Fast iterations and an expensive prefill: a cache miss shows in the time to first token.
SYNTHETIC = [
    "--iteration-ms",
    "4",
    "--enable-kv-block-reuse",
    "--synthetic-block-size",
    "16",
    "--synthetic-prefill-us-per-token",
    "40",
    "--max-batch-size",
    "64",
    "--max-total-tokens",
    "8192",
]


@dataclass
class Executor:
    socket: Path
    proc: subprocess.Popen
    log: Path
    # With --listen every call, on the unix socket too, carries the shared secret.
    secret: str | None = None

    def stats(self) -> executor_pb2.StatsResponse:
        with grpc.insecure_channel(f"unix:{self.socket}") as ch:
            return executor_pb2_grpc.ExecutorStub(ch).Stats(executor_pb2.StatsRequest(), timeout=5)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"executor exited:\n{self.log.read_text()}")
            if self.socket.exists():
                try:
                    with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                        auth = [("authorization", f"Bearer {self.secret}")] if self.secret else []
                        r = executor_pb2_grpc.ExecutorStub(ch).Health(
                            executor_pb2.HealthRequest(), timeout=2, metadata=auth
                        )
                        if r.ready:
                            return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"executor not ready after {timeout}s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """kill -9: the executor dies mid-step, as on a crash or a lost node."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Fleet:
    url: str
    router: subprocess.Popen
    router_log: Path
    executors: list[Executor] = field(default_factory=list)

    def info(self) -> dict:
        return requests.get(f"{self.url}/info", timeout=5).json()

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=5).text


def start_executor(
    directory: Path, name: str, extra: list[str], env: dict[str, str] | None = None
) -> Executor:
    sock = directory / f"{name}.sock"
    log = directory / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorgate.executor",
                "--engine",
                "synthetic",
                "--uds-path",
                str(sock),
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    secret = (env or {}).get("TENSORGATE_EXECUTOR_SECRET")
    return Executor(socket=sock, proc=proc, log=log, secret=secret)


def start_router(
    tokenizer: Path,
    sockets: list[Path],
    directory: Path,
    extra: list[str],
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = directory / f"router-{port}.log"
    # The installed router, or a build named by TENSORGATE_ROUTER_BINARY (as the launcher).
    binary = os.environ.get("TENSORGATE_ROUTER_BINARY")
    argv = [binary] if binary else [sys.executable, "-m", "tensorgate.router"]
    for s in sockets:
        argv += ["--executor", f"unix://{s}"]
    argv += [
        "--tokenizer",
        str(tokenizer),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--stats-interval-ms",
        "200",
        *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    return proc, f"http://127.0.0.1:{port}", log


def wait_workers(fleet: Fleet, healthy: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if fleet.router.poll() is not None:
            raise RuntimeError(f"router exited:\n{fleet.router_log.read_text()}")
        try:
            last = fleet.info()["workers"]
            if sum(w["state"] == "healthy" for w in last) >= healthy:
                return
        except (requests.ConnectionError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{healthy} healthy workers not seen in {timeout}s: {last}")


@contextmanager
def fleet(
    tokenizer: Path,
    executors: list[list[str]],
    router_extra: list[str] = (),
    *,
    start: list[bool] | None = None,
) -> Iterator[Fleet]:
    """Synthetic executors (one flag list each) and a router over all of them. `start[i]`
    False: executor i's socket is given to the router but the process is not started (a worker
    that joins later: start it with `start_executor`)."""
    directory = Path(tempfile.mkdtemp(prefix="tg-fleet-"))
    started: list[Executor] = []
    router = None
    try:
        for i, extra in enumerate(executors):
            if start is None or start[i]:
                started.append(start_executor(directory, f"executor-{i}", [*SYNTHETIC, *extra]))
        for e in started:
            e.wait_ready()
        sockets = [directory / f"executor-{i}.sock" for i in range(len(executors))]
        router, url, log = start_router(tokenizer, sockets, directory, list(router_extra))
        f = Fleet(url=url, router=router, router_log=log, executors=started)
        f.directory = directory  # type: ignore[attr-defined]
        wait_workers(f, len(started))
        yield f
    finally:
        if router is not None:
            stop_process(router)
        for e in started:
            stop_process(e.proc)


# -- the multi-turn chat workload ----------------------------------------------------------------

USERS = 12
TURNS = 4
SYSTEM_TOKENS = 1024
TURN_TOKENS = 64
REPLY_TOKENS = 16


def stream(url: str, ids: list[int], max_new_tokens: int) -> tuple[float, list[int], dict]:
    """/generate_stream on token ids: (time to first token, token ids, last event)."""
    body = {"input_ids": ids, "parameters": {"max_new_tokens": max_new_tokens}}
    return stream_body(url, body)


def stream_body(url: str, body: dict, on_token=None) -> tuple[float, list[int], dict]:
    """/generate_stream: (time to first token, token ids, last event); `on_token(n)` is called
    after the n-th token arrives."""
    start = time.monotonic()
    ttft = None
    tokens: list[int] = []
    last: dict = {}
    with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            last = event
            if "error" in event:
                break
            if ttft is None:
                ttft = time.monotonic() - start
            tokens.append(event["token"]["id"])
            if on_token is not None:
                on_token(len(tokens))
    return ttft if ttft is not None else float("inf"), tokens, last


def user_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 30000) for _ in range(n)]


def multi_turn(url: str, seed: int = 0, users: int = USERS, turns: int = TURNS) -> list[float]:
    """USERS users in parallel, each TURNS turns that extend its own conversation (a long
    system prompt of its own, then its turns and the replies). Returns every turn's TTFT."""

    def user(u: int) -> list[float]:
        rng = random.Random(seed * 1000 + u)
        context = user_prompt(rng, SYSTEM_TOKENS)
        ttfts = []
        for _ in range(turns):
            context += user_prompt(rng, TURN_TOKENS)
            ttft, reply, _ = stream(url, context, REPLY_TOKENS)
            assert len(reply) == REPLY_TOKENS
            ttfts.append(ttft)
            context += reply
        return ttfts

    with ThreadPoolExecutor(users) as pool:
        return [t for ts in pool.map(user, range(users)) for t in ts]


def hit_rate(info: dict) -> float:
    prompt = sum(w["prompt_tokens"] for w in info["workers"])
    cached = sum(w["cached_tokens"] for w in info["workers"])
    return cached / prompt
