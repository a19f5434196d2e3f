"""What a new attention shape costs: SDPA with a mask, as transformers' continuous batching
calls it (one packed sequence, a mask sliced from a larger buffer), at key lengths that change
at every call, as they do from one engine step to the next.

    python benchmarks/sdpa_shapes.py            # on a CUDA machine

For each SDPA backend it times one call per new key length, then the same lengths again.
On an H100 with torch 2.11 / cuDNN 9.19 the default pick for a masked call is cuDNN attention,
which builds an execution plan per shape (docs/benchmarks.md, 2d): the reason the transformers
engine turns it off.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,
    "default, cuDNN off": None,  # what the transformers engine runs
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def timed_call(q_len: int, kv_len: int, args, mask_buffer: torch.Tensor) -> float:
    q = torch.randn(1, args.heads, q_len, args.head_dim, device=args.device, dtype=torch.bfloat16)
    k = torch.randn(1, args.heads, kv_len, args.head_dim, device=args.device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = mask_buffer[..., :q_len, :kv_len]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def sweep(backend, lengths, q_len, args, mask_buffer) -> tuple[list[float], list[float]]:
    passes = []
    for _ in range(2):
        times = []
        for n in lengths:
            if backend is None:
                times.append(timed_call(q_len, n, args, mask_buffer))
            else:
                with sdpa_kernel(backend):
                    times.append(timed_call(q_len, n, args, mask_buffer))
        passes.append(sorted(times))
    return passes[0], passes[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--queries", default="8,64", help="query lengths (tokens in the step)")
    ap.add_argument("--lengths", type=int, default=64, help="new key lengths per sweep")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
        f"{torch.cuda.get_device_name()}"
    )
    mask_buffer = torch.zeros(1, 1, 512, 65536, device=args.device, dtype=torch.bfloat16)
    timed_call(8, 64, args, mask_buffer)  # CUDA context and kernels loaded
    print("| backend | queries | first call per new length p50 / max ms | same again p50 ms |")
    print("| --- | --- | --- | --- |")
    start = 601  # odd lengths, stepping by 8: what a decode batch of 8 adds per step
    for q_len in (int(q) for q in args.queries.split(",")):
        for name, backend in BACKENDS.items():
            lengths = range(start, start + 8 * args.lengths, 8)
            start += 8 * args.lengths + 1  # never a length another sweep has planned
            torch.backends.cuda.enable_cudnn_sdp(name != "default, cuDNN off")
            try:
                first, again = sweep(backend, lengths, q_len, args, mask_buffer)
            except RuntimeError as e:  # a backend that cannot take this call
                print(f"| {name} | {q_len} | not available: {str(e).splitlines()[0][:80]} | |")
                continue
            print(
                f"| {name} | {q_len} | {first[len(first) // 2]:.2f} / {first[-1]:.2f} "
                f"| {again[len(again) // 2]:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
