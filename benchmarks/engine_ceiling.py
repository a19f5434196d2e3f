#!/usr/bin/env python3
"""The ceiling for the serve comparison: transformers' continuous batching driven in-process,
with no HTTP, no tokenizer and no gRPC, in the same closed loop as the load generator (C
requests in flight, each replaced the moment it finishes).

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/engine_ceiling.py --concurrency 8

Two variants, same settings as benchmarks/serve_comparison.py:
- `tensorgate-engine`: tensorgate's TransformersEngine (our per-request sampler installed, the
  consumer thread that builds the wire messages), without the executor's gRPC server;
- `transformers-cb`: the manager as `transformers serve` sets it up (no logits processor).

A stack can only lose to its ceiling; how much is what it costs.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
from pathlib import Path


def prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids, where tokenizers keep their special tokens.
    return [[rng.randrange(256, vocab) for _ in range(length)] for _ in range(n)]


class ClosedLoop:
    """Keeps `concurrency` requests in flight until `total` have finished."""

    def __init__(self, concurrency: int, total: int, submit) -> None:
        self.concurrency, self.total, self.submit = concurrency, total, submit
        self.sent = 0
        self.finished = 0
        self.tokens = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.t0 = 0.0
        self.t1 = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        for _ in range(self.concurrency):
            self._next()

    def _next(self) -> None:
        with self.lock:
            if self.sent >= self.total:
                return
            i = self.sent
            self.sent += 1
        self.submit(i)

    def on_tokens(self, n: int, finished: bool) -> None:
        with self.lock:
            self.tokens += n
            if finished:
                self.finished += 1
                if self.finished == self.total:
                    self.t1 = time.perf_counter()
                    self.done.set()
        if finished:
            self._next()


def run_tensorgate_engine(args, model_dir: Path) -> dict:
    from tensorgate.executor.engines.transformers_engine import (
        TransformersEngine,
        TransformersSettings,
    )
    from tensorgate.v1 import executor_pb2 as pb

    eng = TransformersEngine(
        model_dir,
        TransformersSettings(
            device=args.device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            kv_cache_blocks=args.kv_blocks,
            max_num_tokens=args.max_batch_tokens,
            block_size=64,
        ),
    )
    ids = prompts(eng.vocab_size, args.total + 1, args.input_tokens)
    loop: ClosedLoop | None = None
    warm = threading.Event()

    batches: queue.SimpleQueue = queue.SimpleQueue()

    def drive() -> None:
        # Another thread, as the executor's event loop is: the engine's thread only hands over.
        while (batch := batches.get()) is not None:
            for o in batch.outputs:
                end = o.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                if o.request_id >= 1_000_000:
                    if end:
                        warm.set()
                    continue
                if loop is not None:
                    loop.on_tokens(len(o.token_ids), end)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()

    def request(rid: int, tokens: list[int], n: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            id=rid,
            input_ids=tokens,
            max_new_tokens=n,
            sampling=pb.SamplingParams(),
            ignore_eos=True,
        )

    eng.start(batches.put)
    eng.submit([request(1_000_000, ids[-1], 4)])
    warm.wait(600)
    loop = ClosedLoop(
        args.concurrency,
        args.total,
        lambda i: eng.submit([request(i, ids[i], args.output_tokens)]),
    )
    loop.start()
    loop.done.wait()
    eng.shutdown()
    batches.put(None)
    return {"tokens": loop.tokens, "seconds": loop.t1 - loop.t0}


def run_transformers_cb(args, model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.requests import RequestStatus

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype), device_map=args.device
    ).eval()
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=args.output_tokens),
        continuous_batching_config=ContinuousBatchingConfig(
            page_size=64, num_blocks=args.kv_blocks, max_batch_tokens=args.max_batch_tokens
        ),
    )
    manager.start()
    ids = prompts(model.config.vocab_size, args.total + 1, args.input_tokens)
    manager.add_request(ids[-1], request_id="warm", max_new_tokens=4)
    while manager.get_result(timeout=600).request_id != "warm":
        pass

    def submit(i: int) -> None:
        # No eos, as tensorgate-engine's ignore_eos: every request makes its full length.
        manager.add_request(
            ids[i],
            request_id=str(i),
            max_new_tokens=args.output_tokens,
            streaming=True,
            eos_token_id=-1,
        )

    loop = ClosedLoop(args.concurrency, args.total, submit)
    seen: dict[str, int] = {}

    def consume() -> None:
        while not loop.done.is_set():
            r = manager.get_result(timeout=0.1)
            if r is None:
                continue
            n = len(r.generated_tokens)
            finished = r.status in (RequestStatus.FINISHED, RequestStatus.FAILED)
            loop.on_tokens(n - seen.get(r.request_id, 0), finished)
            seen[r.request_id] = n

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    loop.start()
    loop.done.wait()
    manager.stop(block=True, timeout=10)
    return {"tokens": loop.tokens, "seconds": loop.t1 - loop.t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=("tensorgate-engine", "transformers-cb"), required=True)
    ap.add_argument("--model-dir", help="HF checkpoint (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--total", type=int, default=32, help="requests measured")
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-batch-tokens", type=int, default=2048)
    args = ap.parse_args()
    if args.model_dir is None:
        from tensorgate.models.embedded import ensure_embedded_model

        args.model_dir = str(ensure_embedded_model())
    run = run_tensorgate_engine if args.variant == "tensorgate-engine" else run_transformers_cb
    r = run(args, Path(args.model_dir))
    r |= {
        "variant": args.variant,
        "concurrency": args.concurrency,
        "requests": args.total,
        "output_tok_s": r["tokens"] / r["seconds"],
    }
    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
