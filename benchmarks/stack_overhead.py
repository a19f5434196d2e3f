#!/usr/bin/env python3
"""Stack overhead: tensorgate with the synthetic engine, driven by aiperf, against the
engine's own cadence measured by a gRPC client on the executor's socket (no router, no HTTP).

    PATH=/path/to/aiperf-venv/bin:$PATH python benchmarks/stack_overhead.py

The synthetic engine emits one token per active request every --iteration-ms, so its own
inter-token latency is the iteration time and its time to first token is the wait for the next
iteration. What tensorgate adds is the difference between the two measurements at the same
concurrency. Results go to stdout as a markdown table and to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, metric, run_aiperf, start_tensorgate, write_results
from loadgen import percentile


async def engine_direct(
    socket: Path,
    concurrency: int,
    total: int,
    input_tokens: int,
    output_tokens: int,
    rate: float | None = None,
    seed: int = 0,
) -> dict:
    """Drives the executor on one Generate stream, as the router would, and times tokens as
    they leave it: closed loop (`concurrency` requests in flight), or open loop with Poisson
    arrivals at `rate` per second when `rate` is given."""
    import grpc

    from tensorgate.v1 import executor_pb2 as pb
    from tensorgate.v1 import executor_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = pb_grpc.ExecutorStub(channel)
        outbox: asyncio.Queue = asyncio.Queue()

        async def commands():
            while True:
                item = await outbox.get()
                if item is None:
                    return
                yield item

        call = stub.Generate(commands())
        sent_at: dict[int, float] = {}
        first_at: dict[int, float] = {}
        last_at: dict[int, float] = {}
        counts: dict[int, int] = {}
        ttft: list[float] = []
        itl: list[float] = []
        itl_request: list[float] = []
        next_id = 1
        done = 0
        started = 0

        def submit(n: int) -> None:
            nonlocal next_id, started
            reqs = []
            for _ in range(n):
                rid = next_id
                next_id += 1
                started += 1
                sent_at[rid] = time.perf_counter()
                reqs.append(
                    pb.GenerateRequest(
                        id=rid,
                        input_ids=[1000 + i for i in range(input_tokens)],
                        max_new_tokens=output_tokens,
                        ignore_eos=True,
                    )
                )
            outbox.put_nowait(pb.GenerateCommand(requests=reqs))

        async def arrivals() -> None:
            rng = random.Random(seed)
            due = time.perf_counter()
            for _ in range(total):
                due += rng.expovariate(rate)
                await asyncio.sleep(max(due - time.perf_counter(), 0))
                submit(1)

        t0 = time.perf_counter()
        producer = None
        if rate is None:
            submit(min(concurrency, total))
        else:
            producer = asyncio.create_task(arrivals())
        busy = 0.0
        async for it in call:
            now = time.perf_counter()
            finished = 0
            for o in it.outputs:
                rid = o.request_id
                if o.token_ids:
                    prev = last_at.get(rid)
                    if prev is None:
                        ttft.append(now - sent_at[rid])
                        first_at[rid] = now
                    else:
                        itl.append((now - prev) / len(o.token_ids))
                    last_at[rid] = now
                    counts[rid] = counts.get(rid, 0) + len(o.token_ids)
                if o.finish_reason:
                    finished += 1
                    busy += now - sent_at.pop(rid)
                    n = counts.pop(rid, 0)
                    if n > 1:
                        itl_request.append((last_at[rid] - first_at[rid]) / (n - 1))
                    last_at.pop(rid, None)
                    first_at.pop(rid, None)
            done += finished
            more = min(finished, total - started)
            if rate is None and more > 0:
                submit(more)
            if done >= total:
                break
        wall = time.perf_counter() - t0
        if producer is not None:
            await producer
        outbox.put_nowait(None)
        call.cancel()
    return {
        "mean_in_flight": busy / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "itl_p50_ms": percentile(itl, 50) * 1000,
        "itl_p99_ms": percentile(itl, 99) * 1000,
        "itl_request_p50_ms": percentile(itl_request, 50) * 1000,
        "itl_request_p99_ms": percentile(itl_request, 99) * 1000,
        "output_tok_s": total * output_tokens / wall,
        "req_s": total / wall,
    }


PROBE = Path(__file__).resolve().parent.parent / "target" / "release" / "sse-probe"


def run_probe(args, url: str, c: int, total: int, rate: float | None, route: str) -> dict:
    """One sse-probe run (built on first use with `cargo build --release -p sse-probe`) on
    `route`: chat (/v1/chat/completions) or generate (TGI's /generate_stream)."""
    if not PROBE.exists():
        subprocess.run(
            ["cargo", "build", "--release", "-p", "sse-probe"],
            check=True,
            cwd=PROBE.parent.parent.parent,
        )
    load = ["--rate", f"{rate}"] if rate is not None else ["--concurrency", str(c)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = subprocess.run(
        [
            str(PROBE),
            "--url",
            url,
            "--route",
            route,
            "--model",
            "synthetic",
            "--requests",
            str(total),
            "--warmup",
            str(min(c, 32)),
            "--input-words",
            str(args.input_tokens),
            "--max-tokens",
            str(args.output_tokens),
            *load,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout)
    # Every token the server streamed during the run, the unmeasured warm-up included: the
    # denominator of the router's CPU per token.
    result["streamed_tokens"] = result["output_tokens"] + min(c, 32) * args.output_tokens
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["client_cpu_cores"] = used / (time.monotonic() - t0)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8,64,256,1000")
    ap.add_argument("--iteration-ms", type=float, default=20.0)
    ap.add_argument("--input-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="requests per level = rounds x C")
    ap.add_argument("--port", type=int, default=3017)
    ap.add_argument("--tokenizer", help="tokenizer dir for aiperf (default: the embedded model)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/stack_overhead.json"))
    ap.add_argument(
        "--loadgen",
        choices=("aiperf", "builtin", "probe"),
        default="aiperf",
        help="builtin: benchmarks/loadgen.py, a lean aiohttp client (chat route); probe: "
        "benchmarks/sse-probe, a one-thread Rust client (chat route)",
    )
    ap.add_argument(
        "--arrival",
        choices=("closed", "poisson"),
        default="closed",
        help="closed: C requests always in flight; poisson: open loop at the rate that keeps "
        "C in flight on average (C / (output tokens x iteration time)), for the engine-alone "
        "client and the load generator alike",
    )
    ap.add_argument(
        "--routes",
        default="chat",
        help="with --loadgen probe: comma-separated streaming routes, each run at every level: "
        "chat (/v1/chat/completions), generate (TGI's /generate_stream)",
    )
    ap.add_argument(
        "--no-engine-alone",
        action="store_true",
        help="skip the engine-alone measurement (router CPU runs: halves the time per level)",
    )
    ap.add_argument(
        "--perf-record",
        type=Path,
        help="record the router with `perf record -g` during each level into this folder "
        "(perf-<route>-c<C>.data); run the router from a build with symbols "
        "(TENSORGATE_ROUTER_BINARY, see docs/benchmarks.md)",
    )
    args = ap.parse_args()
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if any(r not in ("chat", "generate") for r in routes) or not routes:
        ap.error("--routes takes chat and/or generate")
    if routes != ["chat"] and args.loadgen != "probe":
        ap.error("--routes other than chat needs --loadgen probe")
    if args.arrival == "poisson" and args.loadgen == "builtin":
        ap.error("--arrival poisson needs --loadgen aiperf or probe")

    if args.tokenizer is None:
        from tensorgate.models.embedded import ensure_embedded_model

        args.tokenizer = str(ensure_embedded_model())
    levels = [int(c) for c in args.concurrency.split(",")]
    headroom = 2 if args.arrival == "poisson" else 1
    work = Path(tempfile.mkdtemp(prefix="tg-bench-"))
    socket = work / "executor.sock"
    served = start_tensorgate(
        args.port,
        [
            "--engine",
            "synthetic",
            "--tokenizer-name",
            args.tokenizer,
            "--iteration-ms",
            str(args.iteration_ms),
            # A fixed cadence: no modelled prefill (the synthetic engine's prefix-cache model
            # lengthens the iteration a request joins), so the stack is what varies.
            "--synthetic-prefill-us-per-token",
            "0",
            "--no-enable-kv-block-reuse",
            # Poisson arrivals overshoot the mean: room for bursts, or they would queue in
            # the engine (or get 429) and the measurement would be of queueing, not the stack.
            "--max-batch-size",
            str(max(levels) * headroom),
            "--max-concurrent-requests",
            str(max(levels) * headroom + 64),
            "--executor-socket",
            str(socket),
        ],
        work / "server.log",
    )
    rows = []
    try:
        for c in levels:
            total = max(args.rounds * c, 16)
            rate = None
            if args.arrival == "poisson":
                rate = c / (args.output_tokens * args.iteration_ms / 1000)
            direct = None
            if not args.no_engine_alone:
                direct = asyncio.run(
                    engine_direct(socket, c, total, args.input_tokens, args.output_tokens, rate)
                )
            for route in routes:
                rows.append(run_level(args, served, c, total, rate, route, direct))
    finally:
        served.stop()
    write_results(args, rows)
    print_table(rows)
    print(f"\naiperf artifacts and server log in {work}", file=sys.stderr)
    return 0


def run_level(args, served, c: int, total: int, rate: float | None, route: str, direct) -> dict:
    """One load level on one route, with the server's CPU over it (and a perf profile of
    the router when asked)."""
    work = Path(tempfile.mkdtemp(prefix="tg-level-"))
    perf = None
    if args.perf_record is not None:
        args.perf_record.mkdir(parents=True, exist_ok=True)
        perf = subprocess.Popen(
            [
                "perf",
                "record",
                # A timer, not hardware counters (virtual machines often have none).
                "-e",
                "cpu-clock",
                "-F",
                "499",
                "-g",
                "-p",
                str(served.pids["router"]),
                "-o",
                str(args.perf_record / f"perf-{route}-c{c}.data"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        cpu0 = {k: cpu_seconds(p) for k, p in served.pids.items()}
        t0 = time.monotonic()
        if args.loadgen == "probe":
            stack = run_probe(args, served.url, c, total, rate, route)
        elif args.loadgen == "builtin":
            from loadgen import run_chat_load

            stack = asyncio.run(
                run_chat_load(
                    served.url, "synthetic", c, total, args.input_tokens, args.output_tokens
                )
            )
        else:
            summary = run_aiperf(
                served.url,
                model="synthetic",
                tokenizer=args.tokenizer,
                # Open loop: a cap well above the mean, so arrivals are not held back.
                concurrency=c if rate is None else 2 * c,
                requests_count=total,
                input_tokens=args.input_tokens,
                output_tokens=args.output_tokens,
                artifacts=work / f"aiperf-c{c}",
                extra=(
                    []
                    if rate is None
                    else ["--request-rate", f"{rate:.3f}", "--arrival-pattern", "poisson"]
                ),
            )
            stack = {
                "req_s": metric(summary, "request_throughput", "avg"),
                "output_tok_s": metric(summary, "output_token_throughput", "avg"),
                "ttft_p50_ms": metric(summary, "time_to_first_token", "p50"),
                "ttft_p99_ms": metric(summary, "time_to_first_token", "p99"),
                "itl_p50_ms": metric(summary, "inter_token_latency", "p50"),
                "itl_p99_ms": metric(summary, "inter_token_latency", "p99"),
            }
        wall = time.monotonic() - t0
        used = {k: cpu_seconds(p) - cpu0[k] for k, p in served.pids.items()}
    finally:
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=120)
    streamed = stack.get("streamed_tokens")
    row = {
        "concurrency": c,
        "route": route,
        "requests": total,
        "loadgen": args.loadgen,
        "arrival": args.arrival,
        "rate": rate,
        "output_tokens": args.output_tokens,
        "stack": stack,
        "engine": direct,
        "cpu_cores": {k: v / wall for k, v in used.items()},
        # CPU of the router process per token it streamed: the figure issue 17 tracks.
        "router_us_per_token": (used["router"] / streamed * 1e6 if streamed else None),
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print(
        "| C | route | in flight (engine alone) | req/s | output tok/s (offered) "
        "| TTFT p50 / p99 ms (engine alone) | ITL p50 / p99 ms (engine alone) "
        "| router CPU (cores) | router µs / token | executor CPU |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def offered(r: dict) -> str:
        # Open loop: the arrival rate times the tokens each request streams.
        rate = r.get("rate")
        return f" ({rate * r['output_tokens']:.0f})" if rate else ""

    def alone(e: dict | None, key: str, fmt: str) -> str:
        return f" ({format(e[key], fmt)})" if e else ""

    # aiperf's ITL is per request ((last - first token) / (tokens - 1)); the probe and the
    # builtin client time every event, and the probe reports both.
    for r in rows:
        s, e, cpu = r["stack"], r["engine"], r["cpu_cores"]
        flight = s.get("mean_in_flight")
        flight = f"{flight:.0f}" if flight is not None else "n/a"
        per_token = r.get("router_us_per_token")
        per_token = f"{per_token:.1f}" if per_token is not None else "n/a"
        e_ttft = f" ({e['ttft_p50_ms']:.1f} / {e['ttft_p99_ms']:.1f})" if e else ""
        e_itl = f" ({e['itl_p50_ms']:.2f} / {e['itl_p99_ms']:.2f})" if e else ""
        print(
            f"| {r['concurrency']} | {r['route']} | {flight}{alone(e, 'mean_in_flight', '.0f')} "
            f"| {s['req_s']:.1f} | {s['output_tok_s']:.0f}{offered(r)} "
            f"| {s['ttft_p50_ms']:.1f} / {s['ttft_p99_ms']:.1f}{e_ttft} "
            f"| {s['itl_p50_ms']:.2f} / {s['itl_p99_ms']:.2f}{e_itl} "
            f"| {cpu.get('router', 0):.2f} | {per_token} | {cpu.get('executor', 0):.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
