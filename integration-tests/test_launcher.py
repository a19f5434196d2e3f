"""The launcher's process duties: readiness, failing fast with the executor's error, clean stop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import requests
from conftest import start_server, stop, wait_healthy


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


def test_sigterm_stops_router_and_executor_without_orphans(tmp_path, embedded_model_dir):
    log = tmp_path / "server.log"
    proc, url, sock = start_server(
        ["--engine", "synthetic", "--tokenizer-name", str(embedded_model_dir)], log
    )
    try:
        wait_healthy(proc, url, log, 120)
        kids = children_of(proc.pid)
        assert len(kids) == 2, f"expected executor and router, got {kids}"
        r = requests.post(
            f"{url}/generate",
            json={"inputs": "hi", "parameters": {"max_new_tokens": 4}},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] is not None
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    assert not [k for k in kids if alive(k)], "child processes outlived the launcher"
    assert not sock.exists(), "executor socket left behind"


def test_executor_failure_exits_non_zero_with_its_error(tmp_path, embedded_model_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    shutil.copy(embedded_model_dir / "tokenizer.json", broken / "tokenizer.json")
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    result = subprocess.run(
        [sys.executable, "-m", "tensorgate.cli", "serve", "--model-id", str(broken), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "the executor exited with code" in result.stderr
    assert "no-such-architecture" in result.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tensorgate.cli", "serve", "--model-id", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
