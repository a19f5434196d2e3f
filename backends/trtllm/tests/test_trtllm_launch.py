"""The executor command for TensorRT-LLM engines: plain for one GPU, mpirun for TP/PP."""

from __future__ import annotations

import sys

import pytest
from conftest import TRTLLM_ENGINES

from tensorgate.launcher.trtllm_launch import (
    TrtllmLaunchError,
    clean_mpi_env,
    executor_command,
    trtllm_command,
)

ARGS = ["--engine", "trtllm", "--model-id", "ENGINE", "--uds-path", "/tmp/x/executor.sock"]


def which_mpirun(name):
    return "/opt/hpcx/ompi/bin/mpirun" if name == "mpirun" else None


def test_world_size_one_is_a_plain_executor():
    cmd = executor_command(
        TRTLLM_ENGINES / "llama-tp1-bf16", ARGS, env={"PATH": "/bin"}, gpu_count=lambda: 1
    )
    assert cmd.world_size == 1
    assert cmd.argv == [sys.executable, "-u", "-m", "tensorgate.executor", *ARGS]
    assert cmd.env == {"PATH": "/bin"}


def test_tensor_parallel_runs_under_mpirun():
    cmd = executor_command(
        TRTLLM_ENGINES / "llama-tp2",
        ARGS,
        env={"PATH": "/bin"},
        which=which_mpirun,
        gpu_count=lambda: 2,
    )
    assert cmd.world_size == 2
    assert cmd.argv[:6] == [
        "/opt/hpcx/ompi/bin/mpirun", "-n", "2", "--allow-run-as-root", "--bind-to", "none",
    ]  # fmt: skip
    # Every rank runs the same executor command; only rank 0 (the leader) serves gRPC.
    assert cmd.argv[6:] == [sys.executable, "-u", "-m", "tensorgate.executor", *ARGS]


def test_mpirun_path_from_the_environment():
    cmd = executor_command(
        TRTLLM_ENGINES / "llama-tp2",
        ARGS,
        env={"TENSORGATE_MPIRUN": "/x/mpirun"},
        which=lambda _: None,
        gpu_count=lambda: 2,
    )
    assert cmd.argv[0] == "/x/mpirun"


def test_missing_mpirun_is_a_clear_error():
    with pytest.raises(TrtllmLaunchError, match=r"world_size 2 .* needs `mpirun`"):
        executor_command(
            TRTLLM_ENGINES / "llama-tp2", ARGS, env={}, which=lambda _: None, gpu_count=lambda: 2
        )


def test_too_few_gpus_fails_before_starting_anything():
    with pytest.raises(TrtllmLaunchError, match=r"world_size 2 .* shows 1 GPU"):
        executor_command(TRTLLM_ENGINES / "llama-tp2", ARGS, env={}, which=which_mpirun,
                         gpu_count=lambda: 1)  # fmt: skip


def test_gpu_count_defaults_to_the_given_environment():
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    with pytest.raises(TrtllmLaunchError, match="CUDA_VISIBLE_DEVICES"):
        executor_command(TRTLLM_ENGINES / "llama-tp2", ARGS, env=env, which=which_mpirun)
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    cmd = executor_command(TRTLLM_ENGINES / "llama-tp2", ARGS, env=env, which=which_mpirun)
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_bad_engine_dir(tmp_path):
    with pytest.raises(TrtllmLaunchError, match=r"config\.json does not exist"):
        executor_command(tmp_path, ARGS, env={}, gpu_count=lambda: 1)


def test_stale_mpi_and_slurm_variables_are_removed():
    env = {
        "PATH": "/bin",
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:4000",
        "OMPI_MCA_ess_base_jobid": "7",
        "OMPI_MCA_pmix_server_uri": "x",
        "OMPI_MCA_btl_tcp_if_include": "eth0",  # user tuning: kept
        "PMIX_RANK": "3",
        "PMIX_SERVER_URI41": "pmix-server.1;tcp4://127.0.0.1:5",
        "PMI_FD": "5",
        "PRTE_MCA_x": "y",
        "SLURM_JOB_ID": "42",
        "SLURM_TASKS_PER_NODE": "1",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    clean, removed = clean_mpi_env(env)
    assert clean == {
        "PATH": "/bin",
        "OMPI_MCA_btl_tcp_if_include": "eth0",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert "SLURM_JOB_ID" in removed and "PMIX_RANK" in removed
    kept, removed = clean_mpi_env({**env, "TENSORGATE_KEEP_MPI_ENV": "1"})
    assert removed == [] and kept["SLURM_JOB_ID"] == "42"


def test_executor_command_cleans_the_environment():
    cmd = executor_command(
        TRTLLM_ENGINES / "llama-tp2",
        ARGS,
        env={"PMIX_RANK": "0", "SLURM_JOB_ID": "1", "HOME": "/root"},
        which=which_mpirun,
        gpu_count=lambda: 2,
    )
    assert cmd.env == {"HOME": "/root"}


def test_supervisor_hook_only_for_trtllm(monkeypatch):
    assert trtllm_command(["--engine", "transformers", "--model-id", "x"]) is None
    assert trtllm_command(["--engine=synthetic"]) is None
    with pytest.raises(TrtllmLaunchError, match="--model-id"):
        trtllm_command(["--engine", "trtllm"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    args = ["--engine", "trtllm", "--model-id", str(TRTLLM_ENGINES / "llama-tp1-bf16")]
    cmd = trtllm_command([*args, "--uds-path", "/tmp/s"])
    assert cmd is not None and cmd.world_size == 1
    assert cmd.argv[-6:] == [*args, "--uds-path", "/tmp/s"]
