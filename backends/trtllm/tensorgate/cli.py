"""`tensorgate serve`: resolve the model, start the executor(s), wait for them, run the router."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from tensorgate.executor.settings import ENGINE_NAMES, ExecutorSettings, add_arguments
from tensorgate.launcher.data_parallel import (
    DEFAULT_MIGRATION_LIMIT,
    DEFAULT_ROUTING,
    ROUTING_POLICIES,
    DataParallelError,
    layout,
    router_pool_args,
    socket_paths,
    visible_gpus,
)
from tensorgate.log_setup import setup_logging

ENGINES = ("auto", *ENGINE_NAMES)
RL_MAX_PAYLOAD_BYTES = 1 << 30
# Keys reach the router by environment only: a command line is visible to every user (ps).
API_KEY_ENV = "TENSORGATE_API_KEY"
RL_CONTROL_KEY_ENV = "TENSORGATE_RL_CONTROL_KEY"


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


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
    # The executor's and engines' settings, declared once for both command lines.
    add_arguments(s, serve=True)
    s.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=128,
        help="requests in the router (queued or running) beyond which new ones get 429",
    )
    s.add_argument(
        "--max-batch-total-tokens",
        type=int,
        help="tokens (prompt + max_new_tokens) running requests may reserve together "
        "(default: the engine's KV cache capacity)",
    )
    s.add_argument(
        "--max-queue-wait-ms",
        type=int,
        default=60_000,
        help="longest wait for admission before a request gets 503",
    )
    s.add_argument("--payload-limit", type=int, default=2_000_000, help="largest body (bytes)")
    s.add_argument(
        "--max-best-of",
        type=int,
        default=2,
        help="most sequences one TGI best_of request may sample (1 turns best_of off)",
    )
    s.add_argument(
        "--api-key",
        default=os.environ.get("TENSORGATE_API_KEY"),
        help="require `Authorization: Bearer KEY` on every route but /health "
        "(default: $TENSORGATE_API_KEY; unset: no key)",
    )
    s.add_argument(
        "--enable-rl-control",
        action="store_true",
        help="serve the rollout-control routes for RL trainers (/release_memory, "
        "/update_weights, /pause_generation, ...: docs/api.md); needs --rl-control-key",
    )
    s.add_argument(
        "--rl-control-key",
        default=os.environ.get("TENSORGATE_RL_CONTROL_KEY"),
        help="the key the rollout-control routes require (`Authorization: Bearer KEY`; never "
        "the --api-key). Default: $TENSORGATE_RL_CONTROL_KEY",
    )
    s.add_argument(
        "--rl-max-payload-bytes",
        type=int,
        default=RL_MAX_PAYLOAD_BYTES,
        help="largest body of a rollout-control route, weights included (bytes; default 1 GiB)",
    )
    s.add_argument(
        "--cors-allow-origin",
        action="append",
        default=[],
        help="allow this origin by CORS (repeatable; * for any). Default: CORS off",
    )
    s.add_argument(
        "--executor-socket",
        type=Path,
        help="unix socket path for the executor (several: NAME-0.sock, NAME-1.sock, ... beside it)",
    )
    s.add_argument(
        "--data-parallel-size",
        type=_at_least(1),
        default=1,
        help="executors of the model behind the router, each on its own socket and, on CUDA, "
        "its own GPUs; each is restarted on its own if it dies (default 1)",
    )
    s.add_argument(
        "--gpus-per-executor",
        type=_at_least(1),
        help="on CUDA, GPUs per executor: executor i gets the visible GPUs i*G..i*G+G-1 as its "
        "CUDA_VISIBLE_DEVICES (default 1 with several executors; one executor keeps every GPU)",
    )
    s.add_argument(
        "--routing",
        choices=ROUTING_POLICIES,
        help=f"how the router picks an executor (default {DEFAULT_ROUTING}; passed to the "
        "router with several executors or when given)",
    )
    s.add_argument(
        "--migration-limit",
        type=_at_least(0),
        help="times a request may move to another executor when its own is lost (default "
        f"{DEFAULT_MIGRATION_LIMIT}; 0: never)",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests get to finish (new ones get 503)",
    )
    s.add_argument(
        "--prompt-format",
        choices=("auto", "raw", "chat"),
        default="auto",
        help="TGI routes: send `inputs` raw, or as one user message through the chat template "
        "(auto: chat for the embedded instruct model, raw otherwise)",
    )
    s.add_argument(
        "--tool-call-parser",
        choices=("auto", "hermes", "llama3_json", "mistral"),
        default="auto",
        help="how the model writes tool calls on /v1/chat/completions (auto: detected from "
        "the chat template)",
    )
    s.add_argument(
        "--json-output", action="store_true", help="log JSON lines (router, executor, launcher)"
    )


def _executor_args(a: argparse.Namespace, source, socket: Path) -> list[str]:
    args = [
        "--engine",
        source.engine,
        "--model-id",
        str(source.model_dir),
        "--uds-path",
        str(socket),
    ]
    # Checked as they were parsed, with the executor's own checks: it will accept them.
    args += ExecutorSettings.from_namespace(a, serve=True).to_argv()
    if source.engine == "trtllm":
        args += ["--tokenizer-name", str(source.tokenizer_dir)]
    if a.json_output:
        args.append("--json-output")
    return args


def _router_args(a: argparse.Namespace, source, sockets: list[Path]) -> list[str]:
    args = [
        "--hostname",
        a.hostname,
        "--port",
        str(a.port),
        *router_pool_args(sockets, a.routing, a.migration_limit),
        "--tokenizer",
        str(source.tokenizer_dir),
        "--model-id",
        source.model_id,
        "--max-concurrent-requests",
        str(a.max_concurrent_requests),
        "--max-queue-wait-ms",
        str(a.max_queue_wait_ms),
        "--payload-limit",
        str(a.payload_limit),
        "--shutdown-timeout",
        str(math.ceil(a.shutdown_timeout)),
    ]
    if a.max_batch_total_tokens is not None:
        args += ["--max-batch-total-tokens", str(a.max_batch_total_tokens)]
    args += ["--max-best-of", str(a.max_best_of)]
    if a.enable_rl_control:
        args += ["--enable-rl-control", "--rl-max-payload-bytes", str(a.rl_max_payload_bytes)]
    for origin in a.cors_allow_origin:
        args += ["--cors-allow-origin", origin]
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
    args += ["--tool-call-parser", a.tool_call_parser]
    if a.json_output:
        args.append("--json-output")
    return args


def rl_control_error(a: argparse.Namespace) -> str | None:
    """Why the rollout-control settings cannot start (None: they can), checked before a model
    is loaded. The router checks the same on its own."""
    if not a.enable_rl_control:
        return None
    if not (a.rl_control_key or "").strip():
        return (
            f"--enable-rl-control needs --rl-control-key KEY (or ${RL_CONTROL_KEY_ENV}): the "
            "control routes change the served weights and must not be open"
        )
    if a.api_key and a.api_key.strip() == a.rl_control_key.strip():
        return "--rl-control-key must differ from --api-key"
    if a.rl_max_payload_bytes < 1:
        return f"--rl-max-payload-bytes must be at least 1, got {a.rl_max_payload_bytes}"
    return None


def router_env(a: argparse.Namespace) -> dict[str, str]:
    """The router's environment: the launcher's, with the keys it was given (and no other)."""
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    env.pop(RL_CONTROL_KEY_ENV, None)
    if a.api_key:
        env[API_KEY_ENV] = a.api_key
    if a.enable_rl_control and a.rl_control_key:
        env[RL_CONTROL_KEY_ENV] = a.rl_control_key
    return env


def serve(a: argparse.Namespace) -> int:
    from tensorgate.launcher.model_source import ModelSourceError, resolve
    from tensorgate.launcher.supervisor import (
        LaunchError,
        Supervisor,
        default_socket_path,
    )

    problem = rl_control_error(a)
    if problem:
        print(f"tensorgate: {problem}", file=sys.stderr)
        return 2
    try:
        source = resolve(a.model_id, a.tokenizer_name, a.engine)
    except ModelSourceError as e:
        print(f"tensorgate: {e}", file=sys.stderr)
        return 2
    try:
        plan = launch_plan(a, source, default_socket_path)
    except DataParallelError as e:
        print(f"tensorgate: {e}", file=sys.stderr)
        return 2
    n = a.data_parallel_size
    logging.getLogger("tensorgate.launcher").info(
        "serving %s with the %s engine%s",
        source.model_id,
        source.engine,
        f" on {n} executors" if n > 1 else "",
    )
    try:
        return Supervisor(plan).run()
    except LaunchError as e:
        print(f"tensorgate: {e}", file=sys.stderr)
        return 1


def launch_plan(a: argparse.Namespace, source, make_socket_dir, gpus: list[str] | None = None):
    """What to start: each executor's arguments, socket and GPUs, and the router's arguments.
    `make_socket_dir` gives (socket, its fresh private directory) when no --executor-socket
    was given; `gpus` are the GPUs to hand out (default: the visible ones)."""
    from tensorgate.launcher.supervisor import ExecutorLaunch, LaunchPlan

    n = a.data_parallel_size
    if n > 1 and a.executor_port is not None:
        raise DataParallelError(
            f"--executor-port cannot serve {n} executors (each would need a port of its own); "
            "leave it out with --data-parallel-size"
        )
    owned = []
    if a.executor_socket is None:
        socket, socket_dir = make_socket_dir()
        owned.append(socket_dir)
        default_dir = socket.parent
    else:
        default_dir = a.executor_socket.parent
    sockets = socket_paths(n, a.executor_socket, default_dir)
    gpus = visible_gpus() if gpus is None else gpus
    executors = [
        ExecutorLaunch(_executor_args(a, source, e.socket), e.socket, e.env)
        for e in layout(n, a.gpus_per_executor, source.engine, a.device, sockets, gpus)
    ]
    if a.gpus_per_executor is not None and not executors[0].env:
        logging.getLogger("tensorgate.launcher").warning(
            "--gpus-per-executor is ignored: the %s engine's executors run on the CPU",
            source.engine,
        )
    first = executors[0]
    return LaunchPlan(
        executor_args=first.args,
        router_args=_router_args(a, source, sockets),
        # The keys go to the router by environment, never argv (visible to every user in ps).
        router_env=router_env(a),
        socket_path=first.socket_path,
        shutdown_timeout=a.shutdown_timeout,
        owned_dirs=owned,
        executor_env=first.env,
        more_executors=executors[1:],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorgate")
    sub = parser.add_subparsers(dest="command", required=True)
    build_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_logging(getattr(a, "json_output", False))
    if a.command == "serve":
        return serve(a)
    return 2


if __name__ == "__main__":
    sys.exit(main())
