"""Benchmark-only timing of guided decoding: where the grammar's work goes, step by step.

Off unless the executor's environment has TENSORGATE_GUIDED_TIMING=<path>; then the sampler
records the wall time of its grammar work in fixed-size histograms (log-spaced buckets, 20 per
decade from 1 µs to 10 s: percentiles to within ±6 %), and a daemon thread rewrites <path> as
JSON (atomically) twice a second while something changed. The histograms are cumulative: a
benchmark reads the file before and after a trial and takes the difference
(`benchmarks/guided_overhead.py`). Off, the cost is one attribute test per step.

What is timed, on the CB thread unless said otherwise:
- `mask`: computing the step's token bitmasks with llguidance, moving them to the logits'
  device, expanding them and masking the rows (on CUDA the timer synchronizes the device after
  the masking, so the kernels' time is in it; the step synchronizes right after anyway);
- `consume`: feeding the chosen tokens to the matchers;
- `prefetch`: computing the next step's masks ahead, on the grammar's worker thread (off the
  step's path: the `mask` of the next step includes only the wait for what is not done);
- `call`: the sampler's whole call (masks, penalties, sampling, consume: all it adds to the
  step) on steps that masked rows, timed from a synchronized device to its result;
- `build`: making a request's matcher from its grammar (where `submit` runs: the executor's
  event loop).
Per step they are recorded whole (`*_step`) and per row (the step's time over its constrained
rows, counted once per row: the per-row histograms' percentiles are over rows x steps).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

ENV = "TENSORGATE_GUIDED_TIMING"

_PER_DECADE = 20
_MIN_NS = 1_000
_BUCKETS = 7 * _PER_DECADE + 1  # bucket 0: up to 1 µs; the last: 10 s and more


def bucket_of(ns: int) -> int:
    if ns <= _MIN_NS:
        return 0
    return min(int(math.log10(ns / _MIN_NS) * _PER_DECADE) + 1, _BUCKETS - 1)


def bucket_bounds_us(i: int) -> tuple[float, float]:
    """The bucket's [low, high) bounds in microseconds."""
    lo = 0.0 if i == 0 else _MIN_NS * 10 ** ((i - 1) / _PER_DECADE) / 1000
    return lo, _MIN_NS * 10 ** (i / _PER_DECADE) / 1000


class Histogram:
    __slots__ = ("counts", "n", "total_ns")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.n = 0
        self.total_ns = 0

    def add(self, ns: int, weight: int = 1) -> None:
        self.counts[bucket_of(ns)] += weight
        self.n += weight
        self.total_ns += ns * weight

    def to_json(self) -> dict:
        return {"counts": list(self.counts), "n": self.n, "total_ns": self.total_ns}


class GuidedTiming:
    NAMES = (
        "mask_row",
        "mask_step",
        "consume_row",
        "consume_step",
        "prefetch_row",
        "prefetch_step",
        "call_row",
        "call_step",
        "build",
    )

    def __init__(self, path: Path, interval_s: float = 0.5) -> None:
        self.path = path
        self.hist = {name: Histogram() for name in self.NAMES}
        self._version = 0
        self._written = -1
        self._interval = interval_s
        threading.Thread(target=self._writer, name="guided-timing", daemon=True).start()

    def record_step(self, kind: str, rows: int, ns: int) -> None:
        """A step's `kind` ("mask", "consume", "prefetch" or "call") work over `rows`
        constrained rows."""
        self.hist[f"{kind}_step"].add(ns)
        self.hist[f"{kind}_row"].add(ns // rows, rows)
        self._version += 1

    def record_build(self, ns: int) -> None:
        self.hist["build"].add(ns)
        self._version += 1

    def snapshot(self) -> dict:
        return {
            "bucket_high_us": [bucket_bounds_us(i)[1] for i in range(_BUCKETS)],
            "pid": os.getpid(),
            "time": time.time(),
            **{name: h.to_json() for name, h in self.hist.items()},
        }

    def write(self) -> None:
        version = self._version
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        tmp.replace(self.path)
        self._written = version

    def _writer(self) -> None:
        while True:
            time.sleep(self._interval)
            if self._version != self._written:
                try:
                    self.write()
                except OSError:
                    pass  # a benchmark's scratch file: never the engine's problem


_lock = threading.Lock()
_instance: GuidedTiming | None = None
_read = False


def from_env() -> GuidedTiming | None:
    """The process's recorder, when TENSORGATE_GUIDED_TIMING names a file; else None."""
    global _instance, _read
    with _lock:
        if not _read:
            _read = True
            path = os.environ.get(ENV)
            if path:
                _instance = GuidedTiming(Path(path))
        return _instance


def percentile_us(counts: list[int], p: float) -> float:
    """The p-th percentile (0-100) of a histogram's counts, as the geometric middle of its
    bucket (the arithmetic one for bucket 0); NaN when empty."""
    n = sum(counts)
    if n == 0:
        return float("nan")
    rank = p / 100 * n
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            lo, hi = bucket_bounds_us(i)
            return hi / 2 if i == 0 else math.sqrt(lo * hi)
    return bucket_bounds_us(len(counts) - 1)[1]
