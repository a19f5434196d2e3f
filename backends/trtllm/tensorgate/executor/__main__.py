"""`python -m tensorgate.executor`: load one engine and serve it on a unix socket, or on TCP with
TLS and a shared secret (executor/remote.py)."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from tensorgate.executor.engine import EngineError
from tensorgate.executor.remote import (
    SECRET_ENV,
    WEAK_SECRET_CHARS,
    RemoteConfigError,
    RemoteListen,
    load_remote_listen,
    parse_listen,
)
from tensorgate.executor.settings import (
    ENGINE_NAMES,
    EngineConfig,
    ExecutorSettings,
    add_arguments,
)
from tensorgate.log_setup import setup_logging


@dataclass(frozen=True)
class CommandLine:
    """What the executor was asked to do: build this engine, serve it on this socket and/or this
    TCP address (with TLS: the certificate and key files)."""

    config: EngineConfig
    uds_path: Path | None
    json_output: bool
    listen: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tensorgate.executor",
        description="Serve one engine over gRPC (token ids in, token ids out).",
    )
    p.add_argument("--engine", choices=ENGINE_NAMES, required=True)
    p.add_argument("--model-id", type=Path, help="checkpoint or engine directory")
    p.add_argument("--uds-path", type=Path, help="unix socket to listen on (0600)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also or instead listen on TCP, for a router on another host: TLS only "
        f"(--tls-cert, --tls-key) and every call must carry the secret in ${SECRET_ENV}",
    )
    p.add_argument("--tls-cert", type=Path, help="--listen: PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="--listen: PEM private key")
    p.add_argument(
        "--tokenizer-name", type=Path, help="trtllm: dir with generation_config.json (eos/pad ids)"
    )
    add_arguments(p)
    p.add_argument("--json-output", action="store_true", help="log JSON lines")
    return p


def parse_args(argv: list[str] | None = None) -> CommandLine:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.uds_path is None and args.listen is None:
        parser.error("give --uds-path PATH (a unix socket) or --listen HOST:PORT (TCP with TLS)")
    if args.listen is None and (args.tls_cert or args.tls_key):
        parser.error("--tls-cert and --tls-key go with --listen")
    if args.listen is not None:
        try:
            parse_listen(args.listen)
        except RemoteConfigError as e:
            parser.error(str(e))
        # The files and the secret are checked by main(), before the engine loads.
        missing = [
            f for f, v in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)) if not v
        ]
        if missing:
            parser.error(
                f"--listen serves off-host, only with TLS: missing {' and '.join(missing)}"
            )
    # Every value was checked as it was parsed; this cannot fail.
    settings = ExecutorSettings.from_namespace(args)
    config = EngineConfig(args.engine, args.model_id, args.tokenizer_name, settings)
    return CommandLine(
        config=config,
        uds_path=args.uds_path,
        json_output=args.json_output,
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def remote_listen(cmd: CommandLine) -> RemoteListen | None:
    """The TLS listener, read and checked; the secret leaves the environment once read, so that
    nothing the engine starts (MPI ranks, workers) inherits it. RemoteConfigError names what is
    wrong."""
    if cmd.listen is None:
        return None
    remote = load_remote_listen(cmd.listen, cmd.tls_cert, cmd.tls_key)
    os.environ.pop(SECRET_ENV, None)
    if len(remote.secret) < WEAK_SECRET_CHARS:
        logging.getLogger("tensorgate.executor").warning(
            "$%s has fewer than %d characters: easy to guess (e.g. `openssl rand -hex 32`)",
            SECRET_ENV,
            WEAK_SECRET_CHARS,
        )
    return remote


class _Stopped(Exception):
    """SIGTERM/SIGINT while the engine was still loading."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    cmd = parse_args(argv)
    setup_logging(cmd.json_output)
    try:
        # Before the engine loads (minutes): a missing secret or certificate fails at once.
        remote = remote_listen(cmd)
    except RemoteConfigError as e:
        print(f"tensorgate executor: {e}", file=sys.stderr)
        return 2
    config = cmd.config
    unread = config.settings.unread_by(config.engine)
    if unread:
        logging.getLogger("tensorgate.executor").warning(
            "the %s engine does not read %s: ignored", config.engine, ", ".join(unread)
        )
    # Loading can take minutes: a stop request then is a clean exit, not a traceback.
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    try:
        from tensorgate.executor.engines import load_engine

        engine = load_engine(config)
    except _Stopped as e:
        logging.getLogger("tensorgate.executor").info("%s while loading: exiting", e)
        logging.shutdown()
        # A half-loaded engine may have started threads that would keep the process alive.
        os._exit(0)
    except EngineError as e:
        print(f"tensorgate executor: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(
            f"tensorgate executor: cannot load the {config.engine} engine: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1

    from tensorgate.executor.server import serve

    # What is loaded by now (torch, transformers, the model: ~10^6 objects) lives as long as
    # the process. Frozen, a full collection no longer walks it: otherwise each one stops every
    # thread, the engine's step included, for 0.1-0.3 s.
    gc.collect()
    gc.freeze()
    # Collectable again at exit: the interpreter's last collections skip frozen objects, and
    # nanobind modules (triton's, which torch._dynamo imports under transformers) report each
    # object still alive then as a leak, tens of stderr lines on every stop.
    atexit.register(gc.unfreeze)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(engine, cmd.uds_path, config.settings.port, stop, remote)

    try:
        asyncio.run(run())
    except _Stopped:
        # A signal in the instant before the loop's handlers were installed.
        engine.shutdown()
    except Exception as e:
        where = " and ".join(w for w in (cmd.uds_path and f"unix:{cmd.uds_path}", cmd.listen) if w)
        print(f"tensorgate executor: cannot serve on {where}: {e}", file=sys.stderr)
        engine.shutdown()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
