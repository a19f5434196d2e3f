#!/usr/bin/env python3
"""Same engine, two stacks: tensorgate (transformers engine) against `transformers serve`
(transformers' own FastAPI server over the same continuous batching), on one model, driven by
aiperf on /v1/chat/completions with streaming.

    PATH=/path/to/aiperf-venv/bin:$PATH python benchmarks/serve_comparison.py          # CPU
    python benchmarks/serve_comparison.py --device cuda --model-dir DIR --loadgen builtin

Both servers get the same KV cache (blocks x block size) and prefill budget. `transformers
serve` needs `pip install fastapi uvicorn`. Results: a markdown table on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Served,
    cpu_seconds,
    metric,
    parse_cpus,
    pinned,
    run_aiperf,
    start_tensorgate,
    wait_http,
    write_results,
)

BLOCK_SIZE = 64


def start_transformers_serve(
    port: int,
    model_dir: str,
    device: str,
    dtype: str,
    blocks: int,
    batch_tokens: int,
    log: Path,
    cpus: set[int] | None = None,
) -> Served:
    cmd = [
        "transformers",
        "serve",
        model_dir,
        "--continuous-batching",
        "--device",
        device,
        "--dtype",
        dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cb-block-size",
        str(BLOCK_SIZE),
        "--cb-num-blocks",
        str(blocks),
        "--cb-max-batch-tokens",
        str(batch_tokens),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=pinned(cpus),
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, "/health", log=log)
    return Served(proc, url, {"server": proc.pid})


def warm(url: str, model: str) -> None:
    """One request before measuring: the first one loads or compiles lazily in both stacks."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()


def server_cpu(served: Served) -> float:
    return sum(cpu_seconds(p) for p in served.pids.values())


def measure(
    served: Served,
    args: argparse.Namespace,
    model: str,
    c: int,
    work: Path,
    name: str,
    idle: dict[str, Served] | None = None,
    rep: int = 0,
) -> dict:
    """One level on one stack; `idle` are the other servers that stay up meanwhile, whose CPU
    (their idle loops) is reported too."""
    idle = idle or {}
    total = max(args.rounds * c, 16)
    cpu0 = {k: cpu_seconds(p) for k, p in served.pids.items()}
    idle0 = {k: server_cpu(v) for k, v in idle.items()}
    t0 = time.monotonic()
    if args.loadgen == "aiperf":
        s = run_aiperf(
            served.url,
            model=model,
            tokenizer=args.model_dir,
            concurrency=c,
            requests_count=total,
            input_tokens=args.input_tokens,
            output_tokens=args.output_tokens,
            artifacts=work / f"{name}-c{c}",
            endpoint_type="chat",
            extra=["--extra-inputs", f"temperature:{args.temperature}"],
        )
        row = {
            "req_s": metric(s, "request_throughput", "avg"),
            "output_tok_s": metric(s, "output_token_throughput", "avg"),
            "ttft_p50_ms": metric(s, "time_to_first_token", "p50"),
            "ttft_p99_ms": metric(s, "time_to_first_token", "p99"),
            "itl_p50_ms": metric(s, "inter_token_latency", "p50"),
            "itl_p99_ms": metric(s, "inter_token_latency", "p99"),
        }
    else:
        from loadgen import run_chat_load

        row = asyncio.run(
            run_chat_load(
                served.url,
                model,
                c,
                total,
                args.input_tokens,
                args.output_tokens,
                temperature=args.temperature,
                record=args.timelines is not None,
                prompt_spread=args.prompt_spread,
            )
        )
    wall = time.monotonic() - t0
    row["cpu_cores"] = {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in served.pids.items()}
    if idle:
        row["idle_other_cores"] = {k: (server_cpu(v) - idle0[k]) / wall for k, v in idle.items()}
    if "timelines" in row:
        args.timelines.mkdir(parents=True, exist_ok=True)
        (args.timelines / f"{name}-c{c}-r{rep}.json").write_text(json.dumps(row.pop("timelines")))
    row.update(stack=name, concurrency=c, requests=total)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def ratio_summary(ratios: list[float]) -> dict:
    """Geometric mean of paired ratios with a 95 % t-interval (on the log scale)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return {"n": len(logs), "geo_mean": math.exp(mean), "ci95": None}
    half = T_95.get(len(logs) - 1, 2.2 if len(logs) < 16 else 2.0) * statistics.stdev(logs)
    half /= math.sqrt(len(logs))
    return {
        "n": len(logs),
        "geo_mean": math.exp(mean),
        "ci95": [math.exp(mean - half), math.exp(mean + half)],
        "min": min(ratios),
        "max": max(ratios),
    }


def start_stack(stack: str, args: argparse.Namespace, levels: list[int], work: Path, cpus):
    if stack == "tensorgate":
        served = start_tensorgate(
            3021,
            [
                "--model-id",
                args.model_dir,
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--max-batch-size",
                str(args.max_batch_size),
                "--kv-cache-blocks",
                str(args.kv_blocks),
                "--max-num-tokens",
                str(args.max_batch_tokens),
                "--max-concurrent-requests",
                str(max(levels) + 64),
                "--hostname",
                "127.0.0.1",
            ],
            work / "tensorgate.log",
            cpus=cpus,
        )
        return served, "tensorgate"
    served = start_transformers_serve(
        3022,
        args.model_dir,
        args.device,
        args.dtype,
        args.kv_blocks,
        args.max_batch_tokens,
        work / "transformers-serve.log",
        cpus=cpus,
    )
    return served, args.model_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="HF checkpoint (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    # 0 (greedy) by default: transformers serve applies one sampling config to its whole
    # continuous batch and samples only when the model's generation config says so, while
    # tensorgate samples each request as it asks (OpenAI's default is temperature 1). Greedy
    # gives both stacks the same work.
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--loadgen", choices=("aiperf", "builtin"), default="aiperf")
    ap.add_argument("--stacks", default="tensorgate,transformers-serve")
    # Interleaved trials: both servers stay up, and each level is measured `--repeat` times
    # per stack in ABBA order, so that drift of the machine (other tenants, clocks) falls on
    # both stacks alike. The summary gives the paired ratio with a 95 % interval.
    ap.add_argument("--repeat", type=int, default=1)
    # On a small machine the load generator competes with the engine for the same cores;
    # pinning gives the servers and the client cores of their own (taskset's list syntax).
    ap.add_argument("--server-cpus", help="pin both servers to these CPUs, e.g. 0")
    ap.add_argument("--client-cpus", help="pin the load generator (and this script) here")
    ap.add_argument(
        "--timelines",
        type=Path,
        help="builtin load generator: write each trial's per-request timelines (start, first "
        "and last text chunk, [DONE], end; wall clock) here, one JSON file per trial",
    )
    ap.add_argument(
        "--prompt-spread",
        type=float,
        default=0.0,
        help="builtin load generator: each request's prompt length is drawn from "
        "input-tokens * [1 - s, 1 + s] (the same set in every trial), so batch shapes do not "
        "repeat from round to round (0: all alike)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve_comparison.json"))
    args = ap.parse_args()
    if args.loadgen != "builtin" and (args.timelines is not None or args.prompt_spread):
        ap.error("--timelines and --prompt-spread need --loadgen builtin")
    if not 0 <= args.prompt_spread < 1:
        ap.error(f"--prompt-spread {args.prompt_spread}: it must be in [0, 1)")
    if args.model_dir is None:
        from tensorgate.models.embedded import ensure_embedded_model

        args.model_dir = str(ensure_embedded_model())
    if args.repeat > 1 and len(args.stacks.split(",")) != 2:
        ap.error("--repeat pairs two stacks: give --stacks A,B")
    server_cpus = parse_cpus(args.server_cpus)
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)
    levels = [int(c) for c in args.concurrency.split(",")]
    stacks = args.stacks.split(",")
    work = Path(tempfile.mkdtemp(prefix="tg-cmp-"))
    rows = []
    if args.repeat <= 1:
        # One stack at a time: the other's memory and idle threads are not on the machine.
        for stack in stacks:
            served, model = start_stack(stack, args, levels, work, server_cpus)
            try:
                warm(served.url, model)
                for c in levels:
                    rows.append(measure(served, args, model, c, work, stack))
            finally:
                served.stop()
    else:
        up: dict[str, tuple[Served, str]] = {}
        try:
            for stack in stacks:
                up[stack] = start_stack(stack, args, levels, work, server_cpus)
                warm(up[stack][0].url, up[stack][1])
            for c in levels:
                for rep in range(args.repeat):
                    for stack in stacks if rep % 2 == 0 else stacks[::-1]:
                        served, model = up[stack]
                        idle = {s: v[0] for s, v in up.items() if s != stack}
                        row = measure(served, args, model, c, work / f"r{rep}", stack, idle, rep)
                        row["repeat"] = rep
                        rows.append(row)
        finally:
            for served, _ in up.values():
                served.stop()
    summary = summarize(rows, stacks, levels) if args.repeat > 1 else {}
    write_results(args, rows, summary)
    print(
        "| stack | concurrency | req/s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| CPU (cores) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cpu = " + ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items())
        print(
            f"| {r['stack']} | {r['concurrency']} | {r['req_s']:.2f} | {r['output_tok_s']:.1f} "
            f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
            f"| {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {cpu} |"
        )
    if summary:
        a, b = stacks[0], stacks[1]
        print(
            f"\n| concurrency | {a} tok/s (mean) | {b} tok/s (mean) | {a} / {b}, paired: "
            "geometric mean [95 % CI] | min / max |"
        )
        print("| --- | --- | --- | --- | --- |")
        for c, s in summary.items():
            r = s["ratio"]
            ci = "n/a" if r["ci95"] is None else f"{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}"
            print(
                f"| {c} | {s[a]:.1f} | {s[b]:.1f} | {r['geo_mean']:.3f} [{ci}] "
                f"| {r.get('min', r['geo_mean']):.3f} / {r.get('max', r['geo_mean']):.3f} |"
            )
    print(f"\nlogs and aiperf artifacts in {work}", file=sys.stderr)
    return 0


def summarize(rows: list[dict], stacks: list[str], levels: list[int]) -> dict:
    """Per level: each stack's mean output tokens/s and the paired ratio of the first stack
    to the second, pairing the two runs of the same repetition."""
    out = {}
    for c in levels:
        by = {
            s: {
                r["repeat"]: r["output_tok_s"]
                for r in rows
                if r["stack"] == s and r["concurrency"] == c
            }
            for s in stacks
        }
        reps = sorted(set(by[stacks[0]]) & set(by[stacks[1]]))
        out[c] = {s: statistics.fmean(by[s].values()) for s in stacks} | {
            "ratio": ratio_summary([by[stacks[0]][i] / by[stacks[1]][i] for i in reps])
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
