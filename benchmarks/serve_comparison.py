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
    run_aiperf,
    start_tensorgate,
    wait_http,
    write_results,
)

BLOCK_SIZE = 64


def start_transformers_serve(
    port: int, model_dir: str, device: str, dtype: str, blocks: int, batch_tokens: int, log: Path
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
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
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


def measure(
    served: Served, args: argparse.Namespace, model: str, c: int, work: Path, name: str
) -> dict:
    total = max(args.rounds * c, 16)
    cpu0 = {k: cpu_seconds(p) for k, p in served.pids.items()}
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
            )
        )
    wall = time.monotonic() - t0
    row["cpu_cores"] = {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in served.pids.items()}
    row.update(stack=name, concurrency=c, requests=total)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


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
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve_comparison.json"))
    args = ap.parse_args()
    if args.model_dir is None:
        from tensorgate.models.embedded import ensure_embedded_model

        args.model_dir = str(ensure_embedded_model())
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tg-cmp-"))
    rows = []
    for stack in args.stacks.split(","):
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
            )
            model = "tensorgate"
        else:
            served = start_transformers_serve(
                3022,
                args.model_dir,
                args.device,
                args.dtype,
                args.kv_blocks,
                args.max_batch_tokens,
                work / "transformers-serve.log",
            )
            model = args.model_dir
        try:
            warm(served.url, model)
            for c in levels:
                rows.append(measure(served, args, model, c, work, stack))
        finally:
            served.stop()
    write_results(args, rows)
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
    print(f"\nlogs and aiperf artifacts in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
