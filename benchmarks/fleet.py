#!/usr/bin/env python3
"""One router, many executors (issue 18): throughput as executors are added, the router's own
CPU per streamed token at each size, and the multi-turn chat workload's TTFT and prefix-cache
hit rate per routing policy.

    # 1 -> 2 -> 4 synthetic executors on this machine
    python benchmarks/fleet.py scaling --executors 1,2,4
    # the same with the transformers engine on GPUs (one per executor)
    python benchmarks/fleet.py scaling --executors 1,2 --engine transformers --device cuda \
        --model-id /path/to/checkpoint --concurrency-per-executor 64
    # multi-turn chat: kv-aware, least-load, round-robin and the oracle
    python benchmarks/fleet.py policies

`scaling` runs `tensorgate serve --data-parallel-size N` and a closed loop of
N x --concurrency-per-executor streams (benchmarks/loadgen.py, /v1/chat/completions), so each
executor gets the same load at every size. It reports output tokens/s, TTFT and ITL, the
router's CPU per token (its process CPU over the run / tokens streamed) and each process's CPU
share, which says what limits the run. Results: a markdown table on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration-tests"))

from common import Served, children, cpu_seconds, wait_http  # noqa: E402
from loadgen import run_chat_load  # noqa: E402


def serve(n: int, args: argparse.Namespace, port: int, log: Path) -> Served:
    import subprocess

    extra = ["--engine", args.engine, "--data-parallel-size", str(n), "--port", str(port)]
    extra += ["--max-concurrent-requests", str(max(128, 2 * n * args.concurrency_per_executor))]
    if args.engine == "synthetic":
        extra += ["--iteration-ms", str(args.iteration_ms), "--max-batch-size", "256"]
    else:
        extra += ["--model-id", args.model_id, "--device", args.device]
        extra += ["--max-batch-size", str(args.max_batch_size)]
    extra += args.serve_args
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorgate.cli", "serve", *extra],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, log=log, timeout=args.startup_timeout)
    pids = {}
    for pid, cmd in children(proc.pid).items():
        if "tensorgate.router" in cmd or "tensorgate-router" in cmd:
            pids["router"] = pid
        elif "tensorgate.executor" in cmd:
            pids[f"executor-{len([k for k in pids if k.startswith('executor')])}"] = pid
    return Served(proc, url, pids)


def scaling(args: argparse.Namespace) -> list[dict]:
    rows = []
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in [int(x) for x in args.executors.split(",")]:
        served = serve(n, args, args.port, out_dir / f"fleet-serve-{n}.log")
        try:
            c = n * args.concurrency_per_executor
            # Warm-up: connections, first batches, (transformers) kernels.
            asyncio.run(run_chat_load(served.url, "x", c, c, args.input_tokens, 8))
            cpu0 = {role: cpu_seconds(pid) for role, pid in served.pids.items()}
            me0 = os.times()
            wall0 = time.monotonic()
            result = asyncio.run(
                run_chat_load(
                    served.url,
                    "x",
                    c,
                    args.rounds * c,
                    args.input_tokens,
                    args.output_tokens,
                    count_tokens=True,
                )
            )
            wall = time.monotonic() - wall0
            me1 = os.times()
            cpu = {role: cpu_seconds(pid) - cpu0[role] for role, pid in served.pids.items()}
            tokens = sum(result.pop("tokens_per_request"))
            client = (me1.user - me0.user) + (me1.system - me0.system)
            row = {
                "executors": n,
                "concurrency": c,
                **{k: round(v, 2) for k, v in result.items()},
                "tokens": tokens,
                "router_us_per_token": round(cpu["router"] / tokens * 1e6, 1),
                "router_cpu_share": round(cpu["router"] / wall, 2),
                "executors_cpu_share": round(
                    sum(v for k, v in cpu.items() if k.startswith("executor")) / wall, 2
                ),
                "client_cpu_share": round(client / wall, 2),
            }
            with urllib.request.urlopen(f"{served.url}/info") as r:
                workers = json.loads(r.read())["workers"]
            row["requests_per_worker"] = [w["requests"] for w in workers]
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            served.stop()
    base = rows[0]["output_tok_s"] if rows else 0
    print(
        "\n| executors | streams | output tok/s | x one | TTFT p50 ms | ITL p50 ms "
        "| router µs/token | CPU: router / executors / client (cores) | requests per worker |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['executors']} | {r['concurrency']} | {r['output_tok_s']:.0f} "
            f"| {r['output_tok_s'] / base:.2f} | {r['ttft_p50_ms']:.1f} | {r['itl_p50_ms']:.1f} "
            f"| {r['router_us_per_token']} | {r['router_cpu_share']} / "
            f"{r['executors_cpu_share']} / {r['client_cpu_share']} | {r['requests_per_worker']} |"
        )
    return rows


def policies(args: argparse.Namespace) -> list[dict]:
    from fleet import fleet, hit_rate, multi_turn

    from tensorgate.models.embedded import ensure_embedded_model

    tokenizer = ensure_embedded_model(progress=False)
    cache = ["--synthetic-cache-blocks", str(args.cache_blocks)]
    rows = []
    runs = [("oracle (1 worker, unbounded cache)", [["--synthetic-cache-blocks", "1000000"]], [])]
    for policy in ("kv-aware", "least-load", "round-robin"):
        runs.append((policy, [cache] * args.workers, ["--routing", policy]))
    for name, executors, router in runs:
        ttfts_all, hits = [], []
        for seed in range(args.repeat):
            with fleet(tokenizer, executors, router) as f:
                ttfts = multi_turn(f.url, seed=seed, users=args.users, turns=args.turns)
                ttfts_all += ttfts
                hits.append(hit_rate(f.info()))
        ttfts_all.sort()
        row = {
            "policy": name,
            "hit_rate": round(statistics.mean(hits), 3),
            "ttft_p50_ms": round(ttfts_all[len(ttfts_all) // 2] * 1000, 1),
            "ttft_p90_ms": round(ttfts_all[int(len(ttfts_all) * 0.9)] * 1000, 1),
            "requests": len(ttfts_all),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| policy | prefix hit rate | TTFT p50 ms | TTFT p90 ms |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['policy']} | {r['hit_rate']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scaling")
    s.add_argument("--executors", default="1,2,4")
    s.add_argument("--engine", default="synthetic", choices=["synthetic", "transformers"])
    s.add_argument("--model-id")
    s.add_argument("--device", default="cuda")
    s.add_argument("--max-batch-size", type=int, default=64)
    s.add_argument("--iteration-ms", type=float, default=20.0)
    s.add_argument("--concurrency-per-executor", type=int, default=64)
    s.add_argument("--input-tokens", type=int, default=64)
    s.add_argument("--output-tokens", type=int, default=64)
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--port", type=int, default=3031)
    s.add_argument("--startup-timeout", type=float, default=600)
    s.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[])
    s.add_argument("--out", type=Path, default=Path("bench-results/fleet_scaling.json"))
    p = sub.add_parser("policies")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--cache-blocks", type=int, default=420)
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-results/fleet_policies.json"))
    args = ap.parse_args()
    rows = scaling(args) if args.what == "scaling" else policies(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
