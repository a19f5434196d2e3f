"""`tensorgate serve --data-parallel-size N`: N executors of the same model behind one router,
each on its own unix socket and, on CUDA, its own GPUs (`--gpus-per-executor G`: executor i gets
the visible GPUs i*G .. i*G+G-1 as its CUDA_VISIBLE_DEVICES). On the CPU they share the CPU.

One executor (the default) keeps what it always had: every visible GPU, its socket, no
CUDA_VISIBLE_DEVICES of its own (a tensor-parallel engine needs all of them), unless
--gpus-per-executor is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROUTING_POLICIES = ("round-robin", "least-load", "kv-aware")
DEFAULT_ROUTING = "kv-aware"
DEFAULT_MIGRATION_LIMIT = 3


class DataParallelError(ValueError):
    """The executors cannot be laid out as asked; the message names the flags."""


@dataclass(frozen=True)
class ExecutorLayout:
    """One executor of the pool: its socket, and what its environment gets on top of the
    launcher's (CUDA_VISIBLE_DEVICES on CUDA)."""

    socket: Path
    env: dict[str, str] = field(default_factory=dict)


def socket_paths(n: int, given: Path | None, default_dir: Path) -> list[Path]:
    """One socket per executor: `given` (--executor-socket) or executor.sock in the launcher's
    private directory for one; for several, `<name>-<i><suffix>` next to it."""
    base = given if given is not None else default_dir / "executor.sock"
    if n == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(n)]


def visible_gpus(
    env: Mapping[str, str] | None = None, count: Callable[[], int] | None = None
) -> list[str]:
    """The GPUs this launcher may hand out, as CUDA_VISIBLE_DEVICES entries: its own
    CUDA_VISIBLE_DEVICES (indexes or UUIDs, up to the first invalid entry), else the driver's
    GPUs 0..n-1. Never initialises CUDA (the driver's list is /proc/driver/nvidia/gpus)."""
    # Imported here: the CLI's import stays light (this pulls in the engines package).
    from tensorgate.executor.engines.trtllm_config import visible_gpu_count

    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        n = visible_gpu_count({"CUDA_VISIBLE_DEVICES": visible})
        return ids[:n]
    n = count() if count is not None else visible_gpu_count(env)
    return [str(i) for i in range(n)]


def on_cuda(engine: str, device: str | None, gpus: list[str]) -> bool:
    """Whether the executors will run on GPUs: trtllm always, transformers unless --device cpu
    (auto takes CUDA when there is a GPU), synthetic never."""
    if engine == "synthetic" or not gpus:
        return False
    return not (device or "auto").startswith("cpu")


def gpu_sets(n: int, per_executor: int, gpus: list[str]) -> list[list[str]]:
    """Executor i's GPUs: gpus[i*per_executor : (i+1)*per_executor]."""
    need = n * per_executor
    if need > len(gpus):
        source = (
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
            if "CUDA_VISIBLE_DEVICES" in os.environ
            else "the NVIDIA driver"
        )
        raise DataParallelError(
            f"--data-parallel-size {n} x --gpus-per-executor {per_executor} needs {need} GPU(s); "
            f"{source} shows {len(gpus)}"
        )
    return [gpus[i * per_executor : (i + 1) * per_executor] for i in range(n)]


def layout(
    n: int,
    gpus_per_executor: int | None,
    engine: str,
    device: str | None,
    sockets: list[Path],
    gpus: list[str],
) -> list[ExecutorLayout]:
    """Each executor's socket and GPUs. `gpus_per_executor` None: not given (1 when there are
    several executors; the one executor keeps every GPU)."""
    if n < 1:
        raise DataParallelError(f"--data-parallel-size must be at least 1, got {n}")
    if gpus_per_executor is not None and gpus_per_executor < 1:
        raise DataParallelError(f"--gpus-per-executor must be at least 1, got {gpus_per_executor}")
    assert len(sockets) == n
    split = n > 1 or gpus_per_executor is not None
    if not (split and on_cuda(engine, device, gpus)):
        return [ExecutorLayout(s) for s in sockets]
    if device and device.startswith("cuda:"):
        raise DataParallelError(
            f"--device {device} names one GPU, but each executor is given its own GPUs "
            "(--data-parallel-size, --gpus-per-executor): use --device cuda or auto"
        )
    sets = gpu_sets(n, gpus_per_executor or 1, gpus)
    return [
        ExecutorLayout(s, {"CUDA_VISIBLE_DEVICES": ",".join(g)})
        for s, g in zip(sockets, sets, strict=True)
    ]


def router_pool_args(
    sockets: list[Path], routing: str | None, migration_limit: int | None
) -> list[str]:
    """The router's executors and pool flags: one executor keeps `--executor-socket` (the
    router's argv of before); several are `--executor unix://PATH` each. Routing and migration
    are passed for a pool, or when given."""
    if len(sockets) == 1:
        args = ["--executor-socket", str(sockets[0])]
    else:
        args = [a for s in sockets for a in ("--executor", f"unix://{s.absolute()}")]
    pool = len(sockets) > 1
    if pool or routing is not None:
        args += ["--routing", routing or DEFAULT_ROUTING]
    if pool or migration_limit is not None:
        limit = DEFAULT_MIGRATION_LIMIT if migration_limit is None else migration_limit
        args += ["--migration-limit", str(limit)]
    return args
