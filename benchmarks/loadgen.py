"""A minimal streaming chat load generator, for the GPU machine only.

aiperf is the load generator of this harness. The lent GPU machine has no network and takes at
most 64 MiB of carried files, while aiperf with its dependencies is about 230 MB of wheels; so on
the GPU the same measurements (closed loop at fixed concurrency, TTFT, ITL between SSE chunks,
output tokens from `usage`) come from this client, which needs only aiohttp. On the CPU machine
both ran against the same server to check they agree (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def run_chat_load(
    url: str,
    model: str,
    concurrency: int,
    total: int,
    input_tokens: int,
    output_tokens: int,
    temperature: float = 0.0,
) -> dict:
    # ~1 token per word for these words in llama-family tokenizers.
    prompt = " ".join(["hello"] * max(input_tokens - 8, 1))
    ttft: list[float] = []
    itl: list[float] = []
    out_tokens = 0
    todo = total
    lock = asyncio.Lock()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal todo, out_tokens
        while True:
            async with lock:
                if todo == 0:
                    return
                todo -= 1
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": output_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": temperature,
            }
            start = time.perf_counter()
            last = None
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        out_tokens += chunk["usage"].get("completion_tokens", 0)
                    has_text = any(
                        (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
                    )
                    if not has_text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                    else:
                        itl.append(now - last)
                    last = now

    timeout = aiohttp.ClientTimeout(total=3600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "req_s": total / wall,
        "output_tok_s": out_tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "itl_p50_ms": percentile(itl, 50) * 1000,
        "itl_p99_ms": percentile(itl, 99) * 1000,
    }
