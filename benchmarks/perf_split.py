#!/usr/bin/env python3
"""Where the router's CPU goes per streamed token, from a `perf record -g` profile.

    python benchmarks/perf_split.py bench-results/perf/perf-chat-c256.data --us-per-token 42.7

Each sample's stack is put in the first category (in the order below) that one of its
frames matches; the shares times the router's measured CPU per token (stack_overhead.py's
`router_us_per_token`) give microseconds per token for each part. Also writes the folded
stacks next to the profile (`.folded`), which inferno-flamegraph or flamegraph.pl draw.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from pathlib import Path

# (category, pattern over the stack's frames joined leaf-first by ";"). First match wins, so
# the allocator (glibc's malloc, or mimalloc's mi_* in a build that uses it) is charged for
# every allocation whoever made it, and a socket write inside a stream's poll counts as a
# socket write.
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    (
        "allocator (malloc/free)",
        re.compile(
            r"^(_int_malloc|_int_free|malloc|cfree|free|__libc_|"
            r"realloc|_int_realloc|malloc_consolidate|"
            r"unlink_chunk|tcache_|_?mi_)"
        ),
    ),
    # On loopback the receiver's TCP work (queueing the data, waking the reader) runs in the
    # sender's system call: the client's cost, charged to the router. Off-host it is not.
    (
        "loopback receive (the client's TCP side)",
        re.compile(
            r"net_rx_action|process_backlog|"
            r"__netif_receive_skb|tcp_v4_rcv|"
            r"ip_local_deliver|ip_rcv"
        ),
    ),
    ("socket writes to clients", re.compile(r"writev|tcp_sendmsg|sendmsg|poll_flush")),
    ("detokenization", re.compile(r"detokenizer::|tokenizers::|byte_level::")),
    ("gRPC decode (prost)", re.compile(r"prost::|tonic::codec|Message>::merge|decode_")),
    ("gRPC transport (h2, executor socket)", re.compile(r"h2::|hyper::proto::h2|tonic::")),
    ("stop-sequence scan", re.compile(r"StopSequences")),
    ("metrics", re.compile(r"metrics::|metrics_exporter_prometheus|metrics_util")),
    (
        "JSON / SSE rendering",
        re.compile(
            r"serde_json|serde::|serde_core|sse::|Meta::body|"
            r"chunk_choice|json_event|token_event|stream_response|"
            r"SseBody|bytes::bytes_mut"
        ),
    ),
    (
        "per-stream hand-off (channels, wake-ups)",
        re.compile(
            r"client::route|mpsc::|"
            r"GenerationStream|Streaming::|"
            r"select_all|wake"
        ),
    ),
    ("HTTP server (hyper h1, axum)", re.compile(r"hyper::|axum::|hyper_util::|tower::")),
    (
        "runtime (scheduler, epoll, futex, idle)",
        re.compile(
            r"tokio::runtime|epoll|futex|"
            r"schedule|park"
        ),
    ),
]


def stacks(data: Path) -> collections.Counter[str]:
    """Folded stacks (root first, as flame graphs want them) with their sample counts."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folded: collections.Counter[str] = collections.Counter()
    frames: list[str] = []
    for line in [*out.splitlines(), ""]:
        line = line.strip()
        if not line:
            if frames:
                folded[";".join(reversed(frames))] += 1
                frames = []
            continue
        parts = line.split(None, 1)
        sym = parts[1] if len(parts) > 1 else parts[0]
        frames.append(re.sub(r"\+0x[0-9a-f]+$", "", sym))
    return folded


def categorise(folded: collections.Counter[str]) -> collections.Counter[str]:
    split: collections.Counter[str] = collections.Counter()
    for stack, n in folded.items():
        frames = stack.split(";")
        leaf_first = ";".join(reversed(frames))
        for name, pattern in CATEGORIES:
            target = frames[-1] if name.startswith("allocator") else leaf_first
            if pattern.search(target):
                split[name] += n
                break
        else:
            split["other"] += n
    return split


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="a perf.data file of the router")
    ap.add_argument("--us-per-token", type=float, help="router CPU µs per streamed token")
    args = ap.parse_args()
    folded = stacks(args.data)
    args.data.with_suffix(".folded").write_text("".join(f"{s} {n}\n" for s, n in folded.items()))
    split = categorise(folded)
    total = sum(split.values())
    if total == 0:
        print("no samples", file=sys.stderr)
        return 1
    head = "| part | share of router CPU |"
    if args.us_per_token:
        head += " µs / token |"
    print(head)
    print("| --- | --- |" + (" --- |" if args.us_per_token else ""))
    for name, n in split.most_common():
        row = f"| {name} | {100 * n / total:.1f} % |"
        if args.us_per_token:
            row += f" {args.us_per_token * n / total:.1f} |"
        print(row)
    print(f"\n{total} samples", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
