"""`python -m tensorgate.executor`: load one engine and serve it on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from tensorgate.executor.engine import EngineError
from tensorgate.log_setup import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tensorgate.executor",
        description="Serve one engine over gRPC (token ids in, token ids out).",
    )
    p.add_argument("--engine", choices=("transformers", "trtllm", "synthetic"), required=True)
    p.add_argument("--model-id", type=Path, help="checkpoint or engine directory")
    p.add_argument("--uds-path", type=Path, required=True, help="unix socket to listen on (0600)")
    p.add_argument("--port", type=int, help="also listen on 127.0.0.1:PORT (off by default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--max-batch-size", type=int, help="most requests the engine runs at once")
    p.add_argument("--max-input-tokens", type=int, help="most prompt tokens per request")
    p.add_argument("--max-total-tokens", type=int, help="most prompt + generated tokens")
    p.add_argument("--max-num-tokens", type=int, help="transformers: tokens per step (prefill)")
    p.add_argument("--kv-cache-blocks", type=int, help="transformers: KV cache size in blocks")
    p.add_argument("--block-size", type=int, help="transformers: tokens per KV block (64)")
    p.add_argument("--iteration-ms", type=float, help="synthetic: time per iteration (20)")
    p.add_argument("--vocab-size", type=int, help="synthetic: vocabulary size (32000)")
    p.add_argument(
        "--tokenizer-name", type=Path, help="trtllm: dir with generation_config.json (eos/pad ids)"
    )
    p.add_argument(
        "--kv-cache-free-gpu-memory-fraction",
        type=float,
        help="trtllm: share of free GPU memory for the KV cache (0.9)",
    )
    p.add_argument(
        "--enable-kv-block-reuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trtllm: KV cache prefix reuse (on)",
    )
    p.add_argument(
        "--capacity-scheduler-policy",
        choices=("guaranteed_no_evict", "max_utilization"),
        help="trtllm: scheduler policy",
    )
    p.add_argument("--json-output", action="store_true", help="log JSON lines")
    args = p.parse_args(argv)
    for name in (
        "max_batch_size",
        "max_input_tokens",
        "max_total_tokens",
        "max_num_tokens",
        "kv_cache_blocks",
        "block_size",
        "vocab_size",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.iteration_ms is not None and args.iteration_ms < 0:
        p.error(f"--iteration-ms must not be negative, got {args.iteration_ms}")
    return args


class _Stopped(Exception):
    """SIGTERM/SIGINT while the engine was still loading."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.json_output)
    # Loading can take minutes: a stop request then is a clean exit, not a traceback.
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    try:
        from tensorgate.executor.engines import load_engine

        engine = load_engine(args)
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
            f"tensorgate executor: cannot load the {args.engine} engine: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1

    from tensorgate.executor.server import serve

    # What is loaded by now (torch, transformers, the model: ~10^6 objects) lives as long as
    # the process. Frozen, a full collection no longer walks it: otherwise each one stops every
    # thread, the engine's step included, for 0.1-0.3 s.
    gc.collect()
    gc.freeze()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(engine, args.uds_path, args.port, stop)

    try:
        asyncio.run(run())
    except _Stopped:
        # A signal in the instant before the loop's handlers were installed.
        engine.shutdown()
    except Exception as e:
        print(f"tensorgate executor: cannot serve on unix:{args.uds_path}: {e}", file=sys.stderr)
        engine.shutdown()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
