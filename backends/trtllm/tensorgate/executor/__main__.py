"""`python -m tensorgate.executor`: load one engine and serve it on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from tensorgate.executor.engine import EngineError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tensorgate.executor")
    p.add_argument("--engine", choices=("transformers", "trtllm", "synthetic"), required=True)
    p.add_argument("--model-id", type=Path, help="checkpoint or engine directory")
    p.add_argument("--uds-path", type=Path, required=True, help="unix socket to listen on")
    p.add_argument("--port", type=int, help="also listen on 127.0.0.1:PORT (off by default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-total-tokens", type=int)
    p.add_argument("--kv-cache-tokens", type=int, help="transformers: KV cache size in tokens")
    p.add_argument("--iteration-ms", type=float, help="synthetic: time per iteration")
    p.add_argument("--vocab-size", type=int, help="synthetic: vocabulary size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    from tensorgate.executor.engines import load_engine
    from tensorgate.executor.server import serve

    try:
        engine = load_engine(args)
    except EngineError as e:
        print(f"tensorgate executor: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(
            f"tensorgate executor: cannot load the {args.engine} engine: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(engine, args.uds_path, args.port, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
