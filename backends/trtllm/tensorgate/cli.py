"""`tensorgate serve`: resolve the model, start the executor, wait for it, run the router."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ENGINES = ("auto", "transformers", "trtllm", "synthetic")


def build_serve_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP")
    s.add_argument(
        "--model-id",
        help="local Hugging Face checkpoint or TensorRT-LLM engine directory "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    s.add_argument("--tokenizer-name", help="directory with tokenizer.json (default: --model-id)")
    s.add_argument("--engine", choices=ENGINES, default="auto")
    s.add_argument("--hostname", default="0.0.0.0", help="HTTP bind address (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=3000)
    s.add_argument("--device", default="auto", help="transformers engine: cpu, cuda or auto")
    s.add_argument("--dtype", default="auto", help="transformers engine: auto, float32, bfloat16")
    s.add_argument("--max-batch-size", type=int, help="most requests the engine runs at once")
    s.add_argument("--max-input-tokens", type=int, help="most prompt tokens per request")
    s.add_argument("--max-total-tokens", type=int, help="most prompt + generated tokens")
    s.add_argument("--max-concurrent-requests", type=int, default=128)
    s.add_argument("--executor-socket", type=Path, help="unix socket path for the executor")
    s.add_argument("--iteration-ms", type=float, help="synthetic engine: time per iteration")
    s.add_argument("--shutdown-timeout", type=float, default=30.0)
    s.add_argument(
        "--prompt-format",
        choices=("auto", "raw", "chat"),
        default="auto",
        help="TGI routes: send `inputs` raw, or as one user message through the chat template "
        "(auto: chat for the embedded instruct model, raw otherwise)",
    )
    s.add_argument("--json-output", action="store_true", help="log JSON lines")


def _executor_args(a: argparse.Namespace, source, socket: Path) -> list[str]:
    args = [
        "--engine",
        source.engine,
        "--model-id",
        str(source.model_dir),
        "--uds-path",
        str(socket),
        "--device",
        a.device,
        "--dtype",
        a.dtype,
    ]
    for flag, value in (
        ("--max-batch-size", a.max_batch_size),
        ("--max-input-tokens", a.max_input_tokens),
        ("--max-total-tokens", a.max_total_tokens),
        ("--iteration-ms", a.iteration_ms),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def _router_args(a: argparse.Namespace, source, socket: Path) -> list[str]:
    args = [
        "--hostname",
        a.hostname,
        "--port",
        str(a.port),
        "--executor-socket",
        str(socket),
        "--tokenizer",
        str(source.tokenizer_dir),
        "--model-id",
        source.model_id,
        "--max-concurrent-requests",
        str(a.max_concurrent_requests),
    ]
    if a.max_input_tokens is not None:
        args += ["--max-input-tokens", str(a.max_input_tokens)]
    if a.max_total_tokens is not None:
        args += ["--max-total-tokens", str(a.max_total_tokens)]
    prompt_format = a.prompt_format
    if prompt_format == "auto":
        # SmolLM2-Instruct ends at once on raw text; its chat template makes it answer.
        embedded = a.model_id is None and source.engine != "synthetic"
        prompt_format = "chat" if embedded else "raw"
    args += ["--prompt-format", prompt_format]
    if a.json_output:
        args.append("--json-output")
    return args


def serve(a: argparse.Namespace) -> int:
    from tensorgate.launcher.model_source import ModelSourceError, resolve
    from tensorgate.launcher.supervisor import (
        LaunchError,
        LaunchPlan,
        Supervisor,
        default_socket_path,
    )

    try:
        source = resolve(a.model_id, a.tokenizer_name, a.engine)
    except ModelSourceError as e:
        print(f"tensorgate: {e}", file=sys.stderr)
        return 2
    owned = []
    if a.executor_socket is not None:
        socket = a.executor_socket
    else:
        socket, socket_dir = default_socket_path()
        owned.append(socket_dir)
    plan = LaunchPlan(
        executor_args=_executor_args(a, source, socket),
        router_args=_router_args(a, source, socket),
        socket_path=socket,
        shutdown_timeout=a.shutdown_timeout,
        owned_dirs=owned,
    )
    logging.getLogger("tensorgate.launcher").info(
        "serving %s with the %s engine", source.model_id, source.engine
    )
    try:
        return Supervisor(plan).run()
    except LaunchError as e:
        print(f"tensorgate: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="tensorgate")
    sub = parser.add_subparsers(dest="command", required=True)
    build_serve_parser(sub)
    a = parser.parse_args(argv)
    if a.command == "serve":
        return serve(a)
    return 2


if __name__ == "__main__":
    sys.exit(main())
