"""The executor's gRPC server (grpcio.aio): Info, Health, Stats and the Generate stream.

Request ids are the router's and unique per connection; the server maps them to engine-wide
ids so that two connections can never collide, and cancels a connection's requests when its
stream closes (the router died or restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tensorgate import __version__
from tensorgate.executor.engine import Engine
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

log = logging.getLogger("tensorgate.executor")

_CLOSED = None  # queue sentinel: the router's side of the stream ended


@dataclass(eq=False)
class _Connection:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # router id -> engine id, for live requests only
    ids: dict[int, int] = field(default_factory=dict)


class ExecutorService(pb_grpc.ExecutorServicer):
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.ready = False
        self.not_ready_reason = "starting"
        self._engine_ids = itertools.count(1)
        # engine id -> (connection, router id)
        self._owners: dict[int, tuple[_Connection, int]] = {}
        self._iteration = 0

    # Called from the engine's thread once per iteration.
    def emit(self, outputs: list[pb.RequestOutput]) -> None:
        self.loop.call_soon_threadsafe(self._route, outputs)

    def _route(self, outputs: list[pb.RequestOutput]) -> None:
        self._iteration += 1
        per_conn: dict[_Connection, list[pb.RequestOutput]] = {}
        owners = self._owners
        for out in outputs:
            owner = owners.get(out.request_id)
            if owner is None:
                continue  # its connection is gone
            conn, router_id = owner
            if out.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                del owners[out.request_id]
                conn.ids.pop(router_id, None)
            out.request_id = router_id
            per_conn.setdefault(conn, []).append(out)
        for conn, outs in per_conn.items():
            conn.queue.put_nowait(pb.IterationOutput(iteration=self._iteration, outputs=outs))

    async def Info(self, request, context):
        return self.engine.info().to_proto(__version__)

    async def Health(self, request, context):
        if not self.ready:
            return pb.HealthResponse(ready=False, reason=self.not_ready_reason)
        ok, reason = self.engine.health()
        return pb.HealthResponse(ready=ok, reason=reason)

    async def Stats(self, request, context):
        return self.engine.stats()

    async def Generate(
        self, request_iterator: AsyncIterator[pb.GenerateCommand], context
    ) -> AsyncIterator[pb.IterationOutput]:
        # Headers first: the router's client waits for them before it starts reading.
        await context.send_initial_metadata(())
        conn = _Connection()
        reader = asyncio.create_task(self._read(request_iterator, conn))
        try:
            while True:
                item = await conn.queue.get()
                if item is _CLOSED:
                    break
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._drop_connection(conn)

    async def _read(self, commands: AsyncIterator[pb.GenerateCommand], conn: _Connection) -> None:
        try:
            async for cmd in commands:
                if cmd.requests:
                    for r in cmd.requests:
                        engine_id = next(self._engine_ids)
                        self._owners[engine_id] = (conn, r.id)
                        conn.ids[r.id] = engine_id
                        r.id = engine_id
                    self.engine.submit(list(cmd.requests))
                if cmd.cancel_ids:
                    ids = [conn.ids[i] for i in cmd.cancel_ids if i in conn.ids]
                    if ids:
                        self.engine.cancel(ids)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            conn.queue.put_nowait(_CLOSED)

    def _drop_connection(self, conn: _Connection) -> None:
        live = list(conn.ids.values())
        for engine_id in live:
            self._owners.pop(engine_id, None)
        conn.ids.clear()
        if live:
            log.info("router stream closed: cancelling its %d live requests", len(live))
            self.engine.cancel(live)


async def serve(engine: Engine, uds_path: Path, port: int | None, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    service = ExecutorService(engine, loop)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
    )
    pb_grpc.add_ExecutorServicer_to_server(service, server)
    uds_path.unlink(missing_ok=True)
    # Only this user may talk to the executor: the socket is created 0600.
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{uds_path}")
        if port:
            # Opt-in only; loopback so that nothing listens on the network by default.
            server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(uds_path, 0o600)
    engine.start(service.emit)
    service.ready = True
    log.info("executor ready on unix:%s", uds_path)
    await stop.wait()
    service.ready = False
    service.not_ready_reason = "shutting down"
    await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
    await server.stop(grace=5)
    uds_path.unlink(missing_ok=True)
