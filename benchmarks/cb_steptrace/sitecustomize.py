"""Step trace of transformers' continuous batching, in any process that imports it.

    PYTHONPATH=benchmarks/cb_steptrace:$PYTHONPATH CB_STEPTRACE_DIR=/tmp/steps <server command>

Both stacks of the serve comparison (tensorgate's executor and `transformers serve`) drive the
same manager loop, so one patch of that loop traces both alike. Each pass of the loop writes one
JSON line to CB_STEPTRACE_DIR/<pid>.jsonl: wall-clock start, the time spent preparing the batch,
in the forward step, and in the update (which delivers outputs), the thread CPU time of the pass,
the batch (requests, query tokens, how many are prefills), or the time waited for work when there
was none. A diagnostic: it adds a few microseconds per step, and is never loaded by the server
itself.
"""

from __future__ import annotations

import atexit
import importlib.abc
import json
import os
import sys
import threading
import time

TARGET = "transformers.generation.continuous_batching.continuous_api"
_DIR = os.environ.get("CB_STEPTRACE_DIR")
_rows: list[dict] = []
_lock = threading.Lock()


def _flush() -> None:
    with _lock:
        rows, _rows[:] = list(_rows), []
    if rows and _DIR:
        os.makedirs(_DIR, exist_ok=True)
        path = os.path.join(_DIR, f"{os.getpid()}.jsonl")
        new = not os.path.exists(path)
        with open(path, "a") as f:
            if new:  # which server this is
                f.write(json.dumps({"argv": sys.argv}) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _record(row: dict) -> None:
    with _lock:
        _rows.append(row)


def _flusher() -> None:
    # Servers are stopped by a signal, so atexit alone would lose the tail; and the manager's
    # thread should not do the file I/O.
    while True:
        time.sleep(0.5)
        _flush()


def _patch(mod) -> None:
    manager_cls = mod.ContinuousBatchingManager
    body = manager_cls._generation_loop_body
    for sched in mod.SCHEDULER_MAPPING.values():
        sched.schedule_batch = _wrap_schedule(sched.schedule_batch)
    processor_cls = mod.ContinuousBatchProcessor
    processor_cls.prepare_next_batch = _timed(processor_cls.prepare_next_batch, "prepare_s")
    processor_cls._generation_step = _timed(processor_cls._generation_step, "step_s")
    processor_cls.update_batch = _timed(processor_cls.update_batch, "update_s")

    def traced_body(self, batch_processor, bootstrapping):
        row = _current.row = {"t": time.time()}
        c0, w0 = time.thread_time(), time.perf_counter()
        result = body(self, batch_processor, bootstrapping)
        row["wall_s"] = time.perf_counter() - w0
        row["cpu_s"] = time.thread_time() - c0
        if "step_s" not in row:
            row["idle"] = True
        _record(row)
        return result

    manager_cls._generation_loop_body = traced_body


class _Current(threading.local):
    row: dict | None = None


_current = _Current()


def _timed(fn, key):
    def wrapper(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return fn(self, *a, **k)
        finally:
            if _current.row is not None:
                _current.row[key] = time.perf_counter() - t0

    return wrapper


def _wrap_schedule(fn):
    def wrapper(self, *a, **k):
        out = fn(self, *a, **k)
        requests, fast, num_q, max_kv = out
        if _current.row is not None and requests is not None:
            _current.row.update(
                requests=len(requests),
                q_tokens=int(num_q),
                prefills=sum(1 for r in requests if r.query_length > 1),
                decode_fast_path=bool(fast),
                max_kv=int(max_kv),
            )
        return out

    return wrapper


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            from importlib.util import find_spec

            spec = find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
    atexit.register(_flush)
    threading.Thread(target=_flusher, name="cb-steptrace", daemon=True).start()
