"""The executor's gRPC server over a real unix socket, with a real grpc client, and the
`python -m tensorgate.executor` process itself."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.executor.server import serve
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

PYTHON_SOURCE = Path(__file__).resolve().parents[1]


def connect(sock: Path, timeout: float = 30) -> grpc.Channel:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.exists():
            channel = grpc.insecure_channel(f"unix:{sock}")
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
                return channel
            except grpc.FutureTimeoutError:
                channel.close()
        time.sleep(0.05)
    raise AssertionError(f"nothing answers on {sock}")


@contextmanager
def served(engine, sock: Path) -> Iterator[tuple[pb_grpc.ExecutorStub, threading.Thread]]:
    """`engine` behind the real gRPC server on `sock`, in a background event loop: a stub, and
    the server's thread (stopped and joined on exit)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(engine, sock, None, stop),), daemon=True
    )
    thread.start()
    channel = connect(sock)
    try:
        yield pb_grpc.ExecutorStub(channel), thread
    finally:
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)


@pytest.fixture
def executor(tmp_path):
    """Runs the server in a background event loop; yields the socket, a stub and the engine."""
    sock = tmp_path / "executor.sock"
    engine = SyntheticEngine(iteration_ms=5, max_batch_size=8, vocab_size=1000)
    with served(engine, sock) as (stub, thread):
        yield sock, stub, engine
    assert not thread.is_alive(), "server did not stop"
    assert not sock.exists(), "the socket is removed at shutdown"


def request(rid: int, n: int, prompt=(1, 2, 3)) -> pb.GenerateRequest:
    return pb.GenerateRequest(id=rid, input_ids=list(prompt), max_new_tokens=n)


class Stream:
    """A Generate stream driven from the test: commands in, iterations out."""

    def __init__(self, stub):
        self._commands: list[pb.GenerateCommand | None] = []
        self._cond = threading.Condition()
        self.calls = stub.Generate(self._iter(), timeout=60)
        self.tokens: dict[int, list[int]] = {}
        self.finish: dict[int, int] = {}
        self.errors: dict[int, str] = {}

    def _iter(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._commands)
                cmd = self._commands.pop(0)
            if cmd is None:
                return  # half-close: done sending
            yield cmd

    def send(self, cmd: pb.GenerateCommand | None) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify_all()

    def read_until(self, done) -> None:
        for it in self.calls:
            assert it.outputs, "an iteration message carries outputs"
            self.absorb(it)
            if done():
                return
        raise AssertionError(f"stream ended early; finished: {self.finish}")

    def absorb(self, it: pb.IterationOutput) -> None:
        for o in it.outputs:
            self.tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason:
                self.finish[o.request_id] = o.finish_reason
                self.errors[o.request_id] = o.error


def test_socket_is_private(executor):
    sock, _, _ = executor
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_info_health_stats(executor):
    _, stub, _ = executor
    info = stub.Info(pb.InfoRequest(), timeout=5)
    assert info.engine == "synthetic"
    assert info.limits.max_batch_size == 8
    assert info.vocab_size == 1000
    assert info.features.stop_token_ids and not info.features.seed
    assert info.executor_version
    health = stub.Health(pb.HealthRequest(), timeout=5)
    assert health.ready and health.reason == ""
    assert stub.Stats(pb.StatsRequest(), timeout=5).active_requests == 0


def test_generate_stream_multiplexes_and_cancels(executor):
    _, stub, _ = executor
    s = Stream(stub)
    s.send(pb.GenerateCommand(requests=[request(1, 3), request(2, 1000)]))
    s.read_until(lambda: 1 in s.finish)
    # Both requests advanced together: 2 got a token in every iteration that 1 did.
    assert len(s.tokens[2]) >= 3
    s.send(pb.GenerateCommand(cancel_ids=[2, 77]))  # 77 is unknown: ignored
    s.read_until(lambda: 2 in s.finish)
    s.send(None)
    assert len(s.tokens[1]) == 3 and s.finish[1] == pb.FINISH_REASON_LENGTH
    assert s.finish[2] == pb.FINISH_REASON_CANCELLED
    assert len(s.tokens[2]) < 1000
    assert set(s.tokens) == {1, 2}
    assert stub.Stats(pb.StatsRequest(), timeout=5).requests_cancelled == 1


def test_two_connections_may_reuse_ids(executor):
    _, stub, engine = executor
    a, b = Stream(stub), Stream(stub)
    a.send(pb.GenerateCommand(requests=[request(1, 2)]))
    b.send(pb.GenerateCommand(requests=[request(1, 40)]))
    a.read_until(lambda: 1 in a.finish)
    b.send(pb.GenerateCommand(cancel_ids=[1]))
    b.read_until(lambda: 1 in b.finish)
    for s in (a, b):
        s.send(None)
    assert len(a.tokens[1]) == 2 and a.finish[1] == pb.FINISH_REASON_LENGTH
    assert b.finish[1] == pb.FINISH_REASON_CANCELLED
    # The engine ran two distinct requests. Their tokens are the same: the synthetic stream is
    # keyed by the prompt (as a greedy model's output is a function of its input).
    assert engine.stats().requests_received == 2
    n = min(len(a.tokens[1]), len(b.tokens[1]))
    assert a.tokens[1][:n] == b.tokens[1][:n]


def test_half_close_still_delivers_every_output_then_ends(executor):
    _, stub, _ = executor
    s = Stream(stub)
    s.send(pb.GenerateCommand(requests=[request(5, 6)]))
    s.send(None)  # done sending, still reading
    for it in s.calls:  # ends by itself once request 5 is over
        s.absorb(it)
    assert len(s.tokens[5]) == 6
    assert s.finish[5] == pb.FINISH_REASON_LENGTH


def test_invalid_and_duplicate_requests_get_error_outputs(executor):
    _, stub, _ = executor
    s = Stream(stub)
    s.send(pb.GenerateCommand(requests=[request(1, 4, prompt=()), request(2, 50)]))
    s.send(pb.GenerateCommand(requests=[request(2, 50)]))  # 2 is still live
    s.read_until(lambda: 1 in s.finish and 2 in s.finish)
    assert s.finish[1] == pb.FINISH_REASON_ERROR and "empty" in s.errors[1]
    assert s.finish[2] == pb.FINISH_REASON_ERROR and "already live" in s.errors[2]
    s.send(pb.GenerateCommand(cancel_ids=[2]))
    s.send(None)
    for it in s.calls:
        s.absorb(it)
    assert s.tokens[2], "the first request 2 kept running"


def test_closing_the_stream_cancels_its_requests(executor):
    _, stub, _ = executor
    s = Stream(stub)
    s.send(pb.GenerateCommand(requests=[request(1, 1000), request(2, 1000)]))
    next(iter(s.calls))  # generation is under way
    s.calls.cancel()  # the router goes away
    s.send(None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = stub.Stats(pb.StatsRequest(), timeout=5)
        if st.requests_cancelled == 2 and st.active_requests == 0:
            break
        time.sleep(0.05)
    assert st.requests_cancelled == 2
    assert st.active_requests == 0


def executor_process(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PYTHON_SOURCE))
    return subprocess.Popen(
        [sys.executable, "-m", "tensorgate.executor", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_executor_process_serves_and_stops_cleanly_on_sigterm(tmp_path):
    sock = tmp_path / "x.sock"
    proc = executor_process("--engine", "synthetic", "--uds-path", str(sock), "--vocab-size", "500")
    try:
        with connect(sock) as channel:
            stub = pb_grpc.ExecutorStub(channel)
            assert stub.Health(pb.HealthRequest(), timeout=5).ready
            assert stub.Info(pb.InfoRequest(), timeout=5).vocab_size == 500
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert not sock.exists()


def test_executor_process_reports_load_failure_in_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = executor_process(
        "--engine", "transformers", "--model-id", str(missing), "--uds-path", str(tmp_path / "s")
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("tensorgate executor:")]
    assert len(lines) == 1 and "no config.json" in lines[0], err
    assert "Traceback" not in err
