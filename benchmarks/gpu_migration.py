#!/usr/bin/env python3
"""Migration on a GPU (issue 18): two transformers executors behind one router, a batch of
greedy and seeded sampled streams, and the same batch again with one executor killed -9
mid-generation. Every stream must complete, and each should equal its run without the fault
token for token; a second run without the fault says how far the engine itself is
deterministic from one batch composition to another (bf16 on a GPU need not be).

    python benchmarks/gpu_migration.py --tokenizer DIR --out results/ [--gpus 0,0]

--gpus names the GPU of each executor (`0,0`: both on one GPU; `0,1`: one each). The model is
a random-weight llama in SmolLM2's vocabulary (benchmarks/gpu_smoke.py's make_model), bf16.
Only the standard library and tensorgate: the lent GPU machine has no network.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(port: int, body: dict, on_token=None) -> tuple[list[int], dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    tokens: list[int] = []
    last: dict = {}
    if r.status != 200:
        return tokens, {"error": f"HTTP {r.status}: {r.read()!r}"}
    for raw in r:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        last = json.loads(line[5:])
        if "error" in last:
            break
        tokens.append(last["token"]["id"])
        if on_token is not None:
            on_token(len(tokens))
    conn.close()
    return tokens, last


def get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def bodies(n: int, max_new: int) -> list[dict]:
    out = []
    for i in range(n):
        params: dict = {"max_new_tokens": max_new}
        if i % 2:
            params |= {"do_sample": True, "temperature": 0.8, "seed": 1000 + i}
        prompt = f"Request {i}: a few words about GPUs and caches."
        out.append({"inputs": prompt, "parameters": params})
    return out


def run_batch(port: int, batch: list[dict], on_token=None) -> list[tuple[list[int], dict]]:
    results: list = [None] * len(batch)

    def one(i: int) -> None:
        results[i] = stream(port, batch[i], on_token if i == 0 else None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--gpus", default="0,0")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--kill-after", type=int, default=24)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", help="the executors' --dtype")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from gpu_smoke import make_model

    work = Path(tempfile.mkdtemp(prefix="tg-gpu-migration-"))
    model = work / "model"
    params = make_model(model, args.tokenizer, layers=args.layers, hidden=args.hidden)
    print(f"model: {params / 1e6:.0f}M parameters (random, bf16)", flush=True)

    executors = []
    for i, gpu in enumerate(args.gpus.split(",")):
        sock = work / f"executor-{i}.sock"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        argv = [sys.executable, "-m", "tensorgate.executor", "--engine", "transformers"]
        argv += ["--model-id", str(model), "--device", "cuda", "--uds-path", str(sock)]
        argv += ["--max-batch-size", "32", "--dtype", args.dtype]
        log = open(work / f"executor-{i}.log", "wb")
        executors.append(
            (sock, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
        )
    port = free_port()
    argv = [sys.executable, "-m", "tensorgate.router", "--tokenizer", str(model)]
    for sock, _ in executors:
        argv += ["--executor", f"unix://{sock}"]
    argv += ["--port", str(port), "--hostname", "127.0.0.1", "--routing", "round-robin"]
    argv += ["--prompt-format", "raw"]
    router = subprocess.Popen(
        argv, stdout=open(work / "router.log", "wb"), stderr=subprocess.STDOUT
    )
    result: dict = {"gpus": args.gpus, "streams": args.streams, "dtype": args.dtype}
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                workers = get(port, "/info")["workers"]
                if sum(w["state"] == "healthy" for w in workers) == len(executors):
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or router.poll() is not None:
                raise SystemExit((work / "router.log").read_text()[-3000:])
            time.sleep(1)
        batch = bodies(args.streams, args.max_new_tokens)
        run_batch(port, batch[:2])  # warm-up
        reference = run_batch(port, batch)
        again = run_batch(port, batch)
        killed = {}

        def on_token(n: int) -> None:
            if n == args.kill_after and not killed:
                busy = [w["id"] for w in get(port, "/info")["workers"] if w["in_flight"] > 0]
                victim = busy[0]
                killed["worker"] = victim
                killed["in_flight"] = get(port, "/info")["workers"][victim]["in_flight"]
                os.kill(executors[victim][1].pid, signal.SIGKILL)

        t0 = time.monotonic()
        faulted = run_batch(port, batch, on_token)
        result["fault_run_s"] = round(time.monotonic() - t0, 2)
        metrics = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        metrics.request("GET", "/metrics")
        moved = [
            line
            for line in metrics.getresponse().read().decode().splitlines()
            if line.startswith("tensorgate_migrations_total")
        ]

        def same(a, b) -> int:
            return sum(x[0] == y[0] for x, y in zip(a, b, strict=True))

        kinds = ["greedy" if i % 2 == 0 else "seeded" for i in range(args.streams)]
        result |= {
            "killed": killed,
            "migrations": moved,
            "errors_in_fault_run": [r[1].get("error") for r in faulted if "error" in r[1]],
            "complete_in_fault_run": sum(len(r[0]) == args.max_new_tokens for r in faulted),
            "equal_without_fault": same(reference, again),
            "equal_with_fault": same(reference, faulted),
            "equal_with_fault_by_kind": {
                k: sum(
                    reference[i][0] == faulted[i][0] for i in range(args.streams) if kinds[i] == k
                )
                for k in ("greedy", "seeded")
            },
            "first_difference": [
                next((j for j, (x, y) in enumerate(zip(a[0], b[0], strict=False)) if x != y), None)
                for a, b in zip(reference, faulted, strict=True)
            ],
        }
    finally:
        router.send_signal(signal.SIGTERM)
        for _, p in executors:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [router, *(p for _, p in executors)]:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    print(json.dumps(result, indent=1), flush=True)
    (args.out / f"gpu_migration_{args.dtype}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
