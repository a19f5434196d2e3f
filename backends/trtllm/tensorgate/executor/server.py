"""The executor's gRPC server (grpcio.aio): Info, Health, Stats, the Generate stream, KV-cache
events and the rollout-control RPCs.

Request ids are the router's and unique per connection; the server maps them to engine-wide
ids so that two connections can never collide. A connection whose stream is cancelled (the
router died or restarted) has its live requests cancelled in the engine; a connection that
only half-closes (done sending) still gets every output of its live requests, then the end.

Every request's final output carries the weight_version the engine had when it emitted that
output (read in the engine's thread, with the output), so an update between two steps labels
each request with the weights that produced its last token.

Control RPCs run on one thread of their own, one at a time, off the event loop: a weight update
takes seconds and must never stall the streams. Their typed errors (executor/control.py) become
INVALID_ARGUMENT, FAILED_PRECONDITION or UNIMPLEMENTED here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tensorgate import __version__
from tensorgate.executor.control import ControlError, ControlResult
from tensorgate.executor.engine import Engine, add_finished
from tensorgate.executor.remote import RemoteListen, SecretCheck, server_credentials
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

# How often KvCacheEvents reads the engine's event buffer: routing decisions tolerate tens of
# milliseconds of staleness, and an idle stream then costs nothing measurable.
KV_EVENT_POLL_S = 0.05

log = logging.getLogger("tensorgate.executor")

_CLOSED = None  # queue sentinel: this connection's stream is over

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# What the executor accepts: gRPC's own ceiling (a signed 32-bit length), so that the limit that
# counts is the router's --rl-max-payload-bytes (1 GiB by default) on UpdateWeights. Only the
# router can connect (a 0600 socket, loopback, or TLS with the shared secret).
MAX_RECEIVE_MESSAGE_BYTES = 2**31 - 1


@dataclass(eq=False)
class _Connection:
    queue: asyncio.Queue[pb.IterationOutput | None] = field(default_factory=asyncio.Queue)
    # router id -> engine id, for live requests only
    ids: dict[int, int] = field(default_factory=dict)
    half_closed: bool = False

    def close_if_done(self) -> None:
        if self.half_closed and not self.ids:
            self.queue.put_nowait(_CLOSED)


class ExecutorService(pb_grpc.ExecutorServicer):
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop
        self.ready = False
        self.not_ready_reason = "starting"
        self._engine_ids = itertools.count(1)
        # engine id -> (connection, router id)
        self._owners: dict[int, tuple[_Connection, int]] = {}
        self._connections: set[_Connection] = set()
        self._iteration = 0
        # One control call at a time, in order, off the event loop.
        self._control_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control")

    def emit(self, batch: pb.IterationOutput) -> None:
        """The engine's `emit`: called from the engine's thread once per iteration. The weight
        version is read here, with the outputs, not later on the event loop."""
        self.loop.call_soon_threadsafe(self._route, batch, self.engine.weight_version)

    def _route(self, batch: pb.IterationOutput, weight_version: str) -> None:
        self._iteration += 1
        owners = self._owners
        conns: list[_Connection | None] = []
        single: _Connection | None = None
        mixed = False
        for out in batch.outputs:
            owner = owners.get(out.request_id)
            if owner is None:
                conns.append(None)  # its connection is gone
                mixed = True
                continue
            conn, router_id = owner
            if out.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                del owners[out.request_id]
                conn.ids.pop(router_id, None)
                out.weight_version = weight_version
            out.request_id = router_id
            conns.append(conn)
            if single is None:
                single = conn
            elif conn is not single:
                mixed = True
        if not mixed:
            # The usual case (one router): forward the engine's message as it is.
            if single is not None:
                batch.iteration = self._iteration
                single.queue.put_nowait(batch)
                single.close_if_done()
            return
        per_conn: dict[_Connection, pb.IterationOutput] = {}
        for out, conn in zip(batch.outputs, conns, strict=True):
            if conn is None:
                continue
            msg = per_conn.get(conn)
            if msg is None:
                msg = per_conn[conn] = pb.IterationOutput(iteration=self._iteration)
            msg.outputs.append(out)
        for conn, msg in per_conn.items():
            conn.queue.put_nowait(msg)
            conn.close_if_done()

    async def Info(self, request, context):
        return self.engine.describe(__version__)

    async def Health(self, request, context):
        if not self.ready:
            return pb.HealthResponse(ready=False, reason=self.not_ready_reason)
        ok, reason = self.engine.health()
        return pb.HealthResponse(ready=ok, reason=reason)

    async def Stats(self, request, context):
        return self.engine.stats()

    async def KvCacheEvents(self, request, context) -> AsyncIterator[pb.KvCacheEventBatch]:
        """Streams the engine's KV-cache events for KV-aware routing, polled every
        KV_EVENT_POLL_S (off the event loop: draining may take the engine's lock)."""
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, self.engine.kv_cache_event_batch)
        if first is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"the {self.engine.info().engine} engine publishes no KV-cache events",
            )
            return
        batch = first
        while True:
            if batch.events:
                yield batch
            await asyncio.sleep(KV_EVENT_POLL_S)
            batch = await loop.run_in_executor(None, self.engine.kv_cache_event_batch)
            if batch is None:
                return

    async def Generate(
        self, request_iterator: AsyncIterator[pb.GenerateCommand], context
    ) -> AsyncIterator[pb.IterationOutput]:
        # Headers first: the router's client waits for them before it starts reading.
        await context.send_initial_metadata(())
        conn = _Connection()
        self._connections.add(conn)
        reader = asyncio.create_task(self._read(request_iterator, conn))
        try:
            while True:
                item = await conn.queue.get()
                if item is _CLOSED:
                    break
                yield item
        finally:
            # Reached on a normal end and when grpc cancels this handler (the peer went away).
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._drop_connection(conn)

    async def _read(self, commands: AsyncIterator[pb.GenerateCommand], conn: _Connection) -> None:
        try:
            async for cmd in commands:
                if cmd.requests:
                    self._submit(cmd.requests, conn)
                if cmd.cancel_ids:
                    ids = [conn.ids[i] for i in cmd.cancel_ids if i in conn.ids]
                    if ids:
                        self.engine.cancel(ids)
        except grpc.aio.AioRpcError:
            conn.queue.put_nowait(_CLOSED)  # the stream broke: treat it as the router gone
            return
        conn.half_closed = True
        conn.close_if_done()

    # -- rollout control --------------------------------------------------------------------------

    async def ReleaseMemory(self, request, context):
        return await self._control(context, "ReleaseMemory", self.engine.release_memory, request)

    async def ResumeMemory(self, request, context):
        return await self._control(context, "ResumeMemory", self.engine.resume_memory, request)

    async def UpdateWeights(self, request, context):
        return await self._control(context, "UpdateWeights", self.engine.update_weights, request)

    async def FlushCache(self, request, context):
        return await self._control(context, "FlushCache", self.engine.flush_cache, None)

    async def PauseGeneration(self, request, context):
        return await self._control(context, "PauseGeneration", self.engine.pause_generation, None)

    async def ContinueGeneration(self, request, context):
        return await self._control(
            context, "ContinueGeneration", self.engine.continue_generation, None
        )

    async def _control(
        self, context, name: str, call: Callable[..., ControlResult], request
    ) -> pb.ControlResponse:
        if isinstance(request, pb.MemoryRequest):
            args: tuple = (list(request.tags),)
        elif request is None:
            args = ()
        else:
            args = (request,)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            result = await loop.run_in_executor(self._control_thread, call, *args)
        except ControlError as e:
            log.info("%s refused (%s): %s", name, e.code.name, e)
            await context.abort(e.code, str(e))
            raise  # unreachable: abort raises
        except Exception as e:
            # A bug or a device failure, not a bad request: said as such, never a silent 200.
            log.exception("%s failed", name)
            engine = self.engine.info().engine
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"{name} failed in the {engine} engine: {type(e).__name__}: {e}",
            )
            raise  # unreachable: abort raises
        log.info(
            "%s done in %.1f ms: %s (weight_version %s)",
            name,
            (time.monotonic() - started) * 1000,
            result.message,
            self.engine.weight_version,
        )
        return pb.ControlResponse(
            weight_version=self.engine.weight_version,
            released_memory_tags=self.engine.released_memory_tags(),
            memory_delta_bytes=result.memory_delta_bytes,
            tensors_updated=result.tensors_updated,
            message=result.message,
        )

    def close_control(self) -> None:
        self._control_thread.shutdown(wait=False, cancel_futures=True)

    def _submit(self, requests, conn: _Connection) -> None:
        accepted = []
        for r in requests:
            if r.id in conn.ids:
                dup = pb.IterationOutput(iteration=self._iteration)
                add_finished(
                    dup,
                    r.id,
                    pb.FINISH_REASON_ERROR,
                    f"request id {r.id} is already live on this connection",
                )
                dup.outputs[-1].weight_version = self.engine.weight_version
                conn.queue.put_nowait(dup)
                continue
            engine_id = next(self._engine_ids)
            self._owners[engine_id] = (conn, r.id)
            conn.ids[r.id] = engine_id
            r.id = engine_id
            accepted.append(r)
        if accepted:
            self.engine.submit(accepted)

    def _drop_connection(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        live = list(conn.ids.values())
        for engine_id in live:
            self._owners.pop(engine_id, None)
        conn.ids.clear()
        if live:
            log.info("router stream closed: cancelling its %d live requests", len(live))
            self.engine.cancel(live)

    def close_all(self) -> None:
        """Ends every stream after what is already queued (used at shutdown)."""
        for conn in list(self._connections):
            conn.queue.put_nowait(_CLOSED)


def _listen_private(server: grpc.aio.Server, uds_path: Path) -> None:
    """Binds the unix socket (grpc creates the file here, at bind) under a 0177 umask, so it is
    0600 from the start: only this user may talk to the executor, with no open window."""
    uds_path.parent.mkdir(parents=True, exist_ok=True)
    uds_path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{uds_path}")
    finally:
        os.umask(old_umask)


class ListenError(Exception):
    """An address could not be bound; the message names it."""


def _listen_tls(server: grpc.aio.Server, remote: RemoteListen) -> None:
    try:
        bound = server.add_secure_port(remote.address, server_credentials(remote))
    except RuntimeError as e:  # grpcio raises for a bad address, key or certificate
        raise ListenError(f"cannot listen with TLS on {remote.address}: {e}") from None
    if not bound:
        raise ListenError(
            f"cannot listen with TLS on {remote.address}: the address is in use or not this "
            "host's, or the certificate and key do not match"
        )


async def serve(
    engine: Engine,
    uds_path: Path | None,
    port: int | None,
    stop: asyncio.Event,
    remote: RemoteListen | None = None,
) -> None:
    """Serves `engine` until `stop` is set, then shuts the engine and the server down. On the
    unix socket `uds_path`, on 127.0.0.1:`port` (plaintext, loopback only), and with `remote`
    on a TCP address with TLS, where every call on every address must carry its secret."""
    if uds_path is None and remote is None:
        raise ListenError("nothing to listen on: give a unix socket or a TLS address")
    loop = asyncio.get_running_loop()
    service = ExecutorService(engine, loop)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ],
        interceptors=[SecretCheck(remote.secret)] if remote is not None else None,
    )
    pb_grpc.add_ExecutorServicer_to_server(service, server)
    where = []
    if remote is not None:
        # First: a refused address then leaves no socket file behind.
        _listen_tls(server, remote)
        where.append(f"{remote.address} (TLS, shared secret)")
    if uds_path is not None:
        _listen_private(server, uds_path)
        where.append(f"unix:{uds_path}")
    if port:
        # Opt-in only, on loopback: nothing listens on the network by default.
        server.add_insecure_port(f"127.0.0.1:{port}")
        where.append(f"127.0.0.1:{port}")
    await server.start()
    if uds_path is not None:
        os.chmod(uds_path, 0o600)  # in case the socket was created elsewhere than at bind
    engine.start(service.emit)
    service.ready = True
    log.info("executor ready on %s", " and ".join(where))
    await stop.wait()
    log.info("shutting down")
    service.ready = False
    service.not_ready_reason = "shutting down"
    service.close_control()
    await loop.run_in_executor(None, engine.shutdown)
    service.close_all()
    await server.stop(grace=5)
    if uds_path is not None:
        uds_path.unlink(missing_ok=True)
