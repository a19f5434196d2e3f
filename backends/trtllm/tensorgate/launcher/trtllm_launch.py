"""How the launcher starts the executor for a TensorRT-LLM engine.

- world_size 1: `python -m tensorgate.executor ...`, as for every engine;
- world_size N > 1 (tensor/pipeline parallel): `mpirun -n N --allow-run-as-root python -m
  tensorgate.executor ...`. Every rank builds the same `tensorrt_llm.bindings.executor.Executor`
  (TensorRT-LLM's MPI *leader* mode, `CommunicationMode.LEADER`, the default of its
  `ParallelConfig`); rank 0 is the leader (`can_enqueue_requests()` is true there) and is the
  only one that serves gRPC on the unix socket; the other ranks run their share of every step
  and exit when the leader shuts down (TrtllmEngine.from_config).

Why leader mode under mpirun rather than TensorRT-LLM's orchestrator mode (where one process
spawns `executorWorker` ranks through MPI_Comm_spawn): spawning needs dynamic-process support
from the MPI runtime, which is often missing or broken in containers and under Slurm; with
mpirun the rank placement is explicit, the supervisor sees one child (mpirun) whose exit means
the executor died, SIGTERM to mpirun reaches every rank, and the rank's stderr reaches the
launcher like any executor's. It is also how TensorRT-LLM's own multi-GPU examples
(`examples/bindings/executor/README.md`) and the Triton backend run engines. Single node only.

A Hugging Face checkpoint (the LLM API flavour, engines/trtllm_llmapi.py) starts as ONE
process whatever its --tensor-parallel-size/--pipeline-parallel-size: `tensorrt_llm.LLM` starts
its own ranks (an MpiPoolSession of tp x pp workers, `tensorrt_llm/llmapi/llm.py`
BaseLLM.__init__, or Ray actors with --rl-hooks). Stale MPI variables are removed for it too.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tensorgate.executor.engine import EngineError
from tensorgate.executor.engines.trtllm_config import (
    check_gpus,
    load_engine_config,
    visible_gpu_count,
)
from tensorgate.launcher.model_source import TRTLLM_LLMAPI, trtllm_flavour

# Set by a parent mpirun/srun or a Slurm allocation. Inherited by a fresh mpirun (or by the
# singleton MPI_Init of a world_size-1 executor) they make it join a job that is not ours:
# "PMIx server not reachable", hangs in MPI_Init, or "not enough slots" from the Slurm
# allocation. User tuning (OMPI_MCA_* such as btl or pml choices) is kept.
_STALE_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "PRTE_", "SLURM_")
_KEEP_PREFIX = "OMPI_MCA_"
_LAUNCHER_MCA = ("OMPI_MCA_orte_", "OMPI_MCA_ess_", "OMPI_MCA_pmix", "OMPI_MCA_prte_")
KEEP_ENV_VAR = "TENSORGATE_KEEP_MPI_ENV"
MPIRUN_VAR = "TENSORGATE_MPIRUN"


class TrtllmLaunchError(Exception):
    """The executor for this engine cannot be started; the message is for the user."""


@dataclass(frozen=True)
class ExecutorCommand:
    argv: list[str]
    env: dict[str, str]
    world_size: int


def clean_mpi_env(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment without stale MPI/PMIx/Slurm job variables, and the names removed."""
    if env.get(KEEP_ENV_VAR) == "1":
        return dict(env), []
    kept: dict[str, str] = {}
    removed: list[str] = []
    for k, v in env.items():
        stale = k.startswith(_STALE_PREFIXES)
        if stale and k.startswith(_KEEP_PREFIX) and not k.startswith(_LAUNCHER_MCA):
            stale = False
        if stale:
            removed.append(k)
        else:
            kept[k] = v
    return kept, sorted(removed)


def _option(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def executor_command(
    engine_dir: Path,
    executor_args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    which: Callable[[str], str | None] = shutil.which,
    gpu_count: Callable[[], int] | None = None,
) -> ExecutorCommand:
    """The command (and environment) that starts the executor for the engine in engine_dir."""
    base_env = dict(os.environ if env is None else env)
    try:
        cfg = load_engine_config(engine_dir)
        check_gpus(cfg, gpu_count or (lambda: visible_gpu_count(base_env)), base_env)
    except EngineError as e:
        raise TrtllmLaunchError(str(e)) from None
    world = cfg.mapping.world_size
    clean, _ = clean_mpi_env(base_env)
    executor = [python, "-u", "-m", "tensorgate.executor", *executor_args]
    if world == 1:
        return ExecutorCommand(argv=executor, env=clean, world_size=1)
    mpirun = base_env.get(MPIRUN_VAR) or which("mpirun")
    if not mpirun:
        raise TrtllmLaunchError(
            f"the engine in {engine_dir} has world_size {world} (tp_size "
            f"{cfg.mapping.tp_size}, pp_size {cfg.mapping.pp_size}) and needs `mpirun`, "
            f"which is not on PATH (set {MPIRUN_VAR} to its path); the TensorRT-LLM release "
            "image and Dockerfile_trtllm have it"
        )
    argv = [
        mpirun,
        "-n",
        str(world),
        # Containers run as root; Open MPI refuses that without the flag.
        "--allow-run-as-root",
        # Each rank drives its own GPU with its own threads: no core pinning.
        "--bind-to",
        "none",
        *executor,
    ]
    return ExecutorCommand(argv=argv, env=clean, world_size=world)


def llmapi_command(
    model_dir: Path,
    executor_args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    gpu_count: Callable[[], int] | None = None,
) -> ExecutorCommand:
    """The command for a checkpoint served through the LLM API: one process; TensorRT-LLM
    starts the other ranks itself."""
    base_env = dict(os.environ if env is None else env)
    world = 1
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size"):
        value = _option(executor_args, flag)
        if value is not None:
            try:
                world *= int(value)
            except ValueError:
                raise TrtllmLaunchError(f"{flag} must be an integer, got {value!r}") from None
    n = (gpu_count or (lambda: visible_gpu_count(base_env)))()
    if n < world:
        raise TrtllmLaunchError(
            f"serving {model_dir} with tensor x pipeline parallel size {world} needs {world} "
            f"GPU(s); {n} visible (CUDA_VISIBLE_DEVICES or the NVIDIA driver)"
        )
    clean, _ = clean_mpi_env(base_env)
    return ExecutorCommand(
        argv=[python, "-u", "-m", "tensorgate.executor", *executor_args],
        env=clean,
        world_size=world,
    )


def trtllm_command(
    executor_args: Sequence[str], *, env: Mapping[str, str] | None = None
) -> ExecutorCommand | None:
    """The supervisor's hook: the command for `--engine trtllm` executor arguments, None for
    any other engine (which starts as before)."""
    if _option(executor_args, "--engine") != "trtllm":
        return None
    model = _option(executor_args, "--model-id")
    if model is None:
        raise TrtllmLaunchError("the trtllm engine needs --model-id ENGINE_DIR or a checkpoint")
    if trtllm_flavour(Path(model)) == TRTLLM_LLMAPI:
        return llmapi_command(Path(model), executor_args, env=env)
    return executor_command(Path(model), executor_args, env=env)
