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
import random
import time
from collections.abc import Callable

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
    record: bool = False,
    prompt_spread: float = 0.0,
    extra: Callable[[int], dict] | None = None,
    prompt: Callable[[int], str] | None = None,
    count_tokens: bool = False,
) -> dict:
    """Closed loop at `concurrency` until `total` requests are done. With `record`, the result
    also has each request's timeline (wall clock, seconds): start, first and last text chunk,
    end of stream. `prompt_spread` s > 0 gives request i a prompt of its own length, drawn
    uniformly from input_tokens * [1 - s, 1 + s], seeded by i: within a run the batch shapes
    do not repeat from one round to the next, as real traffic's do not, while every run sends
    the same set, so that the two stacks of a pair get the same work. `extra(i)`, if given,
    adds fields to request i's body (e.g. a response_format); `prompt(i)` replaces its prompt.
    With `count_tokens`, the result also has `tokens_per_request` (completion tokens, in
    completion order)."""

    # ~1 token per word for these words in llama-family tokenizers.
    def prompt_for(i: int) -> str:
        if prompt is not None:
            return prompt(i)
        n = input_tokens
        if prompt_spread > 0:
            n = round(random.Random(i).uniform(1 - prompt_spread, 1 + prompt_spread) * n)
        return " ".join(["hello"] * max(n - 8, 1))

    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    # From the last text chunk to the end of the stream ([DONE]): time that neither TTFT nor
    # ITL shows, but that a closed loop pays before its next request.
    tail: list[float] = []
    timelines: list[dict] = []
    out_tokens = 0
    per_request: list[int] = []
    todo = total
    lock = asyncio.Lock()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal todo, out_tokens
        while True:
            async with lock:
                if todo == 0:
                    return
                todo -= 1
                index = total - todo - 1
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt_for(index)}],
                "max_tokens": output_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": temperature,
            }
            if extra is not None:
                body |= extra(index)
            start = time.perf_counter()
            wall0 = time.time()
            first = last = done = None
            tokens = 0
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = time.perf_counter()
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        tokens = chunk["usage"].get("completion_tokens", 0)
                        out_tokens += tokens
                    has_text = any(
                        (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
                    )
                    if not has_text:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
            end = time.perf_counter()
            per_request.append(tokens)
            e2e.append(end - start)
            if last is not None:
                tail.append(end - last)
            if record:
                timelines.append(
                    {
                        "start": wall0,
                        "first": None if first is None else wall0 + first - start,
                        "last": None if last is None else wall0 + last - start,
                        "done": None if done is None else wall0 + done - start,
                        "end": wall0 + end - start,
                        "tokens": tokens,
                    }
                )

    timeout = aiohttp.ClientTimeout(total=3600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    result = {
        "req_s": total / wall,
        "output_tok_s": out_tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "itl_p50_ms": percentile(itl, 50) * 1000,
        "itl_p99_ms": percentile(itl, 99) * 1000,
        "e2e_p50_ms": percentile(e2e, 50) * 1000,
        "e2e_p99_ms": percentile(e2e, 99) * 1000,
        "tail_p50_ms": percentile(tail, 50) * 1000,
        "tail_p99_ms": percentile(tail, 99) * 1000,
    }
    if count_tokens:
        result["tokens_per_request"] = per_request
    if record:
        result["timelines"] = timelines
    return result
