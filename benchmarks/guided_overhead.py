#!/usr/bin/env python3
"""The cost of guided decoding: output tokens/s of the same requests with and without a JSON
schema, on one tensorgate server (transformers engine), and the engine's own timing of the
grammar work per step and per row (mask p50/p99).

    python benchmarks/guided_overhead.py                                  # CPU, embedded model
    python benchmarks/guided_overhead.py --device cuda --dtype bfloat16 --model-dir DIR

Like for like. A constrained answer ends when its schema is complete, an unconstrained one at
end-of-sequence: left alone, the two arms would generate different numbers of tokens per request
and so different mixes of prefill and decode. Here they generate the same: every request asks for
`--output-tokens` tokens; the unconstrained arm with `ignore_eos`, the constrained arm with a
schema that cannot be complete before then (a list of at least `--output-tokens` records of one
of three realistic shapes: strings with and without maxLength or a pattern, integers with
bounds, numbers, enums, booleans, nested objects and arrays). Both arms end every request with
finish_reason "length" after exactly that many tokens (checked: the run fails otherwise), so
output tokens/s is per-token throughput of the same work, with and without the mask.
`--shape natural` sends the record schemas themselves (the answer ends when the record is
complete, usually well before the limit) to see the cost on requests as users send them; then
the arms' token counts differ and the ratio mixes in the prefill share.

Trials are interleaved (ABBA: the arm that goes first alternates) and paired, so the machine's
drift falls on both arms; the summary is the geometric mean of the paired ratios
constrained / unconstrained with a 95 % interval. The server runs with
TENSORGATE_GUIDED_TIMING (see tensorgate/executor/engines/guided_timing.py): its histograms,
read before and after each constrained trial, give the mask time per row and per step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, parse_cpus, start_tensorgate, write_results
from loadgen import run_chat_load
from serve_comparison import ratio_summary

from tensorgate.executor.engines.guided_timing import ENV as TIMING_ENV
from tensorgate.executor.engines.guided_timing import percentile_us

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.(com|org|net)$"},
        "role": {"enum": ["engineer", "manager", "designer", "analyst", "intern"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["name", "age", "email", "role", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "paid": {"type": "boolean"},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["order_id", "status", "paid", "lines"],
    "additionalProperties": False,
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "location": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "priority": {"enum": ["low", "medium", "high"]},
        "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["title", "date", "location", "priority", "attendees"],
    "additionalProperties": False,
}
SCHEMAS = [
    ("person", PERSON, "the people who work at a small design studio"),
    ("order", ORDER, "the orders a hardware shop received today"),
    ("event", EVENT, "the events on a city's culture calendar this month"),
]


def schema_for(i: int, shape: str, n_tokens: int) -> tuple[str, dict]:
    name, record, _ = SCHEMAS[i % len(SCHEMAS)]
    if shape == "natural":
        return name, record
    # At least one token per record: the list cannot be complete within n_tokens.
    return f"{name}_list", {"type": "array", "items": record, "minItems": n_tokens}


def prompt_for(i: int, shape: str) -> str:
    name, _, what = SCHEMAS[i % len(SCHEMAS)]
    if shape == "natural":
        return f"Give one record of {what} as JSON ({name})."
    return f"List {what} as JSON records ({name}), as many as you can."


def read_timing(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def timing_delta(before: dict | None, after: dict | None) -> dict:
    """Per histogram: the counts recorded between two snapshots."""
    if after is None:
        return {}
    out = {}
    for name, h in after.items():
        if not isinstance(h, dict) or "counts" not in h:
            continue
        b = (before or {}).get(name) or {"counts": [0] * len(h["counts"]), "total_ns": 0}
        out[name] = {
            "counts": [x - y for x, y in zip(h["counts"], b["counts"], strict=True)],
            "total_ns": h["total_ns"] - b["total_ns"],
        }
    return out


def summarize_timing(delta: dict) -> dict:
    out = {}
    for name, h in delta.items():
        n = sum(h["counts"])
        out[name] = {
            "n": n,
            "p50_us": percentile_us(h["counts"], 50),
            "p99_us": percentile_us(h["counts"], 99),
            "mean_us": h["total_ns"] / n / 1000 if n else float("nan"),
        }
    return out


def add_delta(acc: dict, delta: dict) -> None:
    for name, h in delta.items():
        into = acc.setdefault(name, {"counts": [0] * len(h["counts"]), "total_ns": 0})
        into["counts"] = [x + y for x, y in zip(into["counts"], h["counts"], strict=True)]
        into["total_ns"] += h["total_ns"]


def settled_timing(path: Path) -> dict | None:
    """The timing file once the writer (every 0.5 s, when something changed) has caught up with
    everything recorded before this call."""
    time.sleep(1.1)
    return read_timing(path)


def measure(
    url: str, args, c: int, arm: str, timing_path: Path, pids: dict, total: int | None = None
) -> dict:
    total = total or max(args.rounds * c, 16)
    guided = arm == "guided"

    def extra(i: int) -> dict:
        body: dict = {"ignore_eos": True} if not guided or args.shape == "fixed" else {}
        if guided:
            name, schema = schema_for(i, args.shape, args.output_tokens)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            }
        return body

    before = settled_timing(timing_path) if guided else None
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    row = asyncio.run(
        run_chat_load(
            url,
            "tensorgate",
            c,
            total,
            0,
            args.output_tokens,
            temperature=0.0,
            extra=extra,
            prompt=lambda i: prompt_for(i, args.shape),
            count_tokens=True,
        )
    )
    wall = time.monotonic() - t0
    row["cpu_cores"] = {k: (cpu_seconds(p) - cpu0[k]) / wall for k, p in pids.items()}
    tokens = row.pop("tokens_per_request")
    row.update(
        arm=arm,
        concurrency=c,
        requests=total,
        output_tokens=sum(tokens),
        tokens_per_request_mean=statistics.fmean(tokens),
        tokens_per_request_min=min(tokens),
    )
    if args.shape == "fixed" and (len(tokens) != total or set(tokens) != {args.output_tokens}):
        raise SystemExit(
            f"{arm} at {c} streams: requests generated {sorted(set(tokens))} tokens, not all "
            f"{args.output_tokens}: the arms would not be doing the same work"
        )
    if guided:
        after = settled_timing(timing_path)
        row["timing_delta"] = timing_delta(before, after)
        row["timing"] = summarize_timing(row["timing_delta"])
    print(json.dumps({k: v for k, v in row.items() if k != "timing_delta"}), file=sys.stderr)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="HF checkpoint (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="8,64")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="requests per trial: rounds x streams")
    ap.add_argument("--repeat", type=int, default=3, help="pairs of trials per level")
    ap.add_argument("--shape", choices=("fixed", "natural"), default="fixed")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    ap.add_argument("--server-cpus", help="pin the server to these CPUs (taskset's syntax)")
    ap.add_argument("--client-cpus", help="pin the load generator (and this script) here")
    ap.add_argument("--port", type=int, default=3031)
    ap.add_argument("--out", type=Path, default=Path("bench-results/guided_overhead.json"))
    args = ap.parse_args()
    if args.model_dir is None:
        from tensorgate.models.embedded import ensure_embedded_model

        args.model_dir = str(ensure_embedded_model())
    client_cpus = parse_cpus(args.client_cpus)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tg-guided-"))
    timing_path = work / "guided_timing.json"
    os.environ[TIMING_ENV] = str(timing_path)
    served = start_tensorgate(
        args.port,
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
            "--max-total-tokens",
            str(max(2048, args.output_tokens + 512)),
            "--hostname",
            "127.0.0.1",
        ],
        work / "tensorgate.log",
        cpus=parse_cpus(args.server_cpus),
    )
    rows = []
    try:
        # Warm-up: one request per arm and schema, so that no trial pays first-use costs.
        n = len(SCHEMAS)
        for arm in ("plain", "guided"):
            measure(served.url, args, n, arm, timing_path, served.pids, total=n)
        for c in levels:
            for rep in range(args.repeat):
                for arm in ("plain", "guided") if rep % 2 == 0 else ("guided", "plain"):
                    row = measure(served.url, args, c, arm, timing_path, served.pids)
                    row["repeat"] = rep
                    rows.append(row)
    finally:
        served.stop()
    summary = summarize(rows, levels)
    write_results(args, rows, summary)
    print_table(summary, args)
    print(f"\nserver log in {work}", file=sys.stderr)
    return 0


def summarize(rows: list[dict], levels: list[int]) -> dict:
    out = {}
    for c in levels:
        by = {
            arm: {r["repeat"]: r for r in rows if r["arm"] == arm and r["concurrency"] == c}
            for arm in ("plain", "guided")
        }
        reps = sorted(set(by["plain"]) & set(by["guided"]))
        acc: dict = {}
        for r in by["guided"].values():
            add_delta(acc, r["timing_delta"])
        out[c] = {
            "plain_tok_s": statistics.fmean(r["output_tok_s"] for r in by["plain"].values()),
            "guided_tok_s": statistics.fmean(r["output_tok_s"] for r in by["guided"].values()),
            "plain_itl_p50_ms": statistics.fmean(r["itl_p50_ms"] for r in by["plain"].values()),
            "guided_itl_p50_ms": statistics.fmean(r["itl_p50_ms"] for r in by["guided"].values()),
            "ratio": ratio_summary(
                [by["guided"][i]["output_tok_s"] / by["plain"][i]["output_tok_s"] for i in reps]
            ),
            "pairs": [
                [by["plain"][i]["output_tok_s"], by["guided"][i]["output_tok_s"]] for i in reps
            ],
            "timing": summarize_timing(acc),
        }
    return out


def print_table(summary: dict, args) -> None:
    print(
        "| streams | tok/s plain | tok/s schema | schema / plain, paired [95 % CI] | mask per row "
        "p50 / p99 µs | mask per step p50 / p99 ms | sampler call per step p50 / p99 ms "
        "| consume per row p50 µs | masks ahead per step p50 / p99 ms | matcher build p50 / "
        "p99 ms | ITL p50 plain / schema ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    nan = {"p50_us": float("nan"), "p99_us": float("nan")}

    def ms(t: dict, name: str) -> str:
        h = t.get(name, nan)
        return f"{h['p50_us'] / 1000:.2f} / {h['p99_us'] / 1000:.2f}"

    for c, s in summary.items():
        r, t = s["ratio"], s["timing"]
        ci = "n/a" if r["ci95"] is None else f"{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}"
        mr, cr = t.get("mask_row", nan), t.get("consume_row", nan)
        print(
            f"| {c} | {s['plain_tok_s']:.1f} | {s['guided_tok_s']:.1f} "
            f"| {r['geo_mean']:.3f} [{ci}] | {mr['p50_us']:.0f} / {mr['p99_us']:.0f} "
            f"| {ms(t, 'mask_step')} | {ms(t, 'call_step')} | {cr['p50_us']:.1f} "
            f"| {ms(t, 'prefetch_step')} | {ms(t, 'build')} "
            f"| {s['plain_itl_p50_ms']:.1f} / {s['guided_itl_p50_ms']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
