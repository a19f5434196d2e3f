"""schemathesis against the served OpenAPI document: every route, generated bodies valid and
invalid, checked for 5xx, undocumented status codes, content types, and responses (SSE events
included) that do not match their schemas.

The synthetic engine keeps each generation to a few milliseconds. One check is left out:
`positive_data_acceptance` (schema-valid bodies must be accepted), because some refusals are by
design and depend on the running engine, not on the document: sampling parameters the engine
cannot honour, tools and response_format, prompts over the token limits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server, stop, wait_healthy

pytestmark = pytest.mark.timeout(600)

MIN_CASES = 500


def st_binary() -> list[str]:
    found = shutil.which("st") or shutil.which("schemathesis")
    if found:
        return [found]
    return [sys.executable, "-m", "schemathesis.cli"]


def test_schemathesis_finds_nothing(tmp_path: Path):
    log = tmp_path / "server.log"
    proc, url, _ = start_server(
        [
            "--engine",
            "synthetic",
            "--iteration-ms",
            "1",
            "--max-total-tokens",
            "64",
            "--max-input-tokens",
            "48",
        ],
        log,
    )
    try:
        wait_healthy(proc, url, log, 300)
        run = subprocess.run(
            [
                *st_binary(),
                "run",
                f"{url}/api-doc/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "60",
                "--seed",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        stop(proc)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated, out[-4000:]
    assert int(generated.group(1)) >= MIN_CASES, out[-4000:]
    assert "failures" not in out.split("Test cases:")[-1], out[-4000:]


def test_schemathesis_finds_nothing_on_the_control_routes(tmp_path: Path):
    """The rollout-control routes (--enable-rl-control), with the control key. Only they are
    run: a generated pause or weight bucket holds generation until a continue or finalize that
    may never be generated, which would leave the generation routes waiting."""
    log = tmp_path / "server.log"
    key = "schemathesis-control-key"
    env = {k: v for k, v in os.environ.items() if k != "TENSORGATE_API_KEY"}
    proc, url, _ = start_server(
        ["--engine", "synthetic", "--iteration-ms", "1", "--enable-rl-control"],
        log,
        env={**env, "TENSORGATE_RL_CONTROL_KEY": key},
    )
    try:
        wait_healthy(proc, url, log, 300)
        run = subprocess.run(
            [
                *st_binary(),
                "run",
                f"{url}/api-doc/openapi.json",
                "--include-tag",
                "Rollout control",
                "--header",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "60",
                "--seed",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        stop(proc)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated, out[-4000:]
    assert int(generated.group(1)) >= 200, out[-4000:]
    assert "failures" not in out.split("Test cases:")[-1], out[-4000:]
