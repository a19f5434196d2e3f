"""The executor's gRPC server over a real unix socket, with a real grpc client."""

from __future__ import annotations

import asyncio
import stat
import threading

import grpc
import pytest

from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.executor.server import serve
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc


@pytest.fixture
def executor(tmp_path):
    """Runs the server in a background event loop; yields the socket path."""
    sock = tmp_path / "executor.sock"
    engine = SyntheticEngine(iteration_ms=5, max_batch_size=8, vocab_size=1000)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(engine, sock, None, stop),), daemon=True
    )
    thread.start()
    channel = None
    for _ in range(100):
        if sock.exists():
            channel = grpc.insecure_channel(f"unix:{sock}")
            try:
                grpc.channel_ready_future(channel).result(timeout=5)
                break
            except grpc.FutureTimeoutError:
                channel.close()
        threading.Event().wait(0.05)
    assert channel is not None, "server did not start"
    yield sock, pb_grpc.ExecutorStub(channel), engine
    channel.close()
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=20)
    assert not thread.is_alive(), "server did not stop"


def request(rid: int, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(id=rid, input_ids=[1, 2, 3], max_new_tokens=n)


def test_socket_is_private(executor):
    sock, _, _ = executor
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_info_health_stats(executor):
    _, stub, _ = executor
    info = stub.Info(pb.InfoRequest(), timeout=5)
    assert info.engine == "synthetic"
    assert info.limits.max_batch_size == 8
    assert info.vocab_size == 1000
    assert stub.Health(pb.HealthRequest(), timeout=5).ready
    assert stub.Stats(pb.StatsRequest(), timeout=5).active_requests == 0


class Stream:
    """A Generate stream driven from the test: commands in, iterations out."""

    def __init__(self, stub):
        self._commands: list[pb.GenerateCommand | None] = []
        self._cond = threading.Condition()
        self.calls = stub.Generate(self._iter())

    def _iter(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._commands)
                cmd = self._commands.pop(0)
            if cmd is None:
                return
            yield cmd

    def send(self, cmd: pb.GenerateCommand | None) -> None:
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify_all()


def test_generate_stream_multiplexes_and_cancels(executor):
    _, stub, _ = executor
    s = Stream(stub)
    s.send(pb.GenerateCommand(requests=[request(1, 3), request(2, 1000)]))
    tokens: dict[int, list[int]] = {1: [], 2: []}
    finish: dict[int, int] = {}
    cancelled_sent = False
    for it in s.calls:
        assert it.outputs, "an iteration message carries outputs"
        for o in it.outputs:
            tokens[o.request_id].extend(o.token_ids)
            if o.finish_reason:
                finish[o.request_id] = o.finish_reason
        if 1 in finish and not cancelled_sent:
            s.send(pb.GenerateCommand(cancel_ids=[2]))
            cancelled_sent = True
        if 2 in finish:
            break
    s.send(None)
    assert len(tokens[1]) == 3 and finish[1] == pb.FINISH_REASON_LENGTH
    assert finish[2] == pb.FINISH_REASON_CANCELLED
    assert len(tokens[2]) < 1000
    assert stub.Stats(pb.StatsRequest(), timeout=5).requests_cancelled == 1


def test_two_connections_may_reuse_ids(executor):
    _, stub, _ = executor
    a, b = Stream(stub), Stream(stub)
    a.send(pb.GenerateCommand(requests=[request(1, 2)]))
    b.send(pb.GenerateCommand(requests=[request(1, 4)]))
    counts = []
    for s in (a, b):
        n = 0
        for it in s.calls:
            for o in it.outputs:
                assert o.request_id == 1
                n += len(o.token_ids)
                if o.finish_reason:
                    break
            else:
                continue
            break
        s.send(None)
        counts.append(n)
    assert counts == [2, 4]


def test_closing_the_stream_cancels_its_requests(executor):
    _, stub, _ = executor
    s = Stream(stub)
    s.send(pb.GenerateCommand(requests=[request(1, 1000), request(2, 1000)]))
    next(iter(s.calls))  # generation is under way
    s.calls.cancel()  # the router goes away
    s.send(None)
    for _ in range(100):
        st = stub.Stats(pb.StatsRequest(), timeout=5)
        if st.requests_cancelled == 2:
            break
        threading.Event().wait(0.05)
    assert st.requests_cancelled == 2
    assert st.active_requests == 0
