"""The wheel that `make wheel` left in dist/ installs into a fresh virtual environment and serves.

The environment reuses this environment's torch, transformers and the rest (gigabytes, at the
newest versions `make test` covers) as --system-site-packages would, without a download;
tensorgate itself comes only from the wheel, which the test checks. `make
test-lowest` installs the same wheel among the lowest allowed versions."""

from __future__ import annotations

import os
import re
import signal
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
WHEEL_NAME = re.compile(r"tensorgate-[\w.]+-cp311-abi3-manylinux_2_28_x86_64\.whl")


@pytest.fixture(scope="module")
def wheel() -> Path:
    wheels = sorted((ROOT / "dist").glob("tensorgate-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in dist/ (run `make wheel`), found {wheels}"
    return wheels[0]


def test_the_wheel_is_abi3_and_manylinux(wheel: Path):
    assert WHEEL_NAME.fullmatch(wheel.name), wheel.name
    # auditwheel agrees with the tag: the extension needs nothing beyond glibc 2.28.
    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'platform tag: "manylinux_2_28_x86_64"' in " ".join(show.split()), show


def test_the_wheel_installs_into_a_fresh_environment_and_serves(
    tmp_path: Path, wheel: Path, embedded_model_dir: Path
):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True,
        env=env,
    )
    # Then this environment's packages, after the venv's own: what --system-site-packages gives,
    # but also when this environment is itself a venv, and only once the wheel is in (pip would
    # take a tensorgate seen there for installed). Their .pth files are not run, so this
    # checkout's editable tensorgate stays out.
    (site_dir,) = venv.glob("lib/python3*/site-packages")
    (site_dir / "reuse-test-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # tensorgate and its router module come from the wheel, not from this checkout; every
    # runtime dependency the wheel declares is satisfied.
    probe = subprocess.run(
        [
            python,
            "-c",
            "import tensorgate, tensorgate._router as r\n"
            "from importlib import metadata\n"
            "from packaging.utils import canonicalize_name as c\n"
            "from tensorgate.executor.versions import check_versions, declared_ranges\n"
            "ranges = declared_ranges()\n"
            "check_versions([r for r in ranges if r != c('tensorgate')], ranges=ranges)\n"
            "print(tensorgate.__file__); print(r.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    for path in probe.stdout.split():
        assert Path(path).is_relative_to(venv), f"{path} is not from the wheel"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sock = Path(tempfile.mkdtemp(prefix="tg-wheel-")) / "executor.sock"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                venv / "bin" / "tensorgate",
                "serve",
                "--hostname",
                "127.0.0.1",
                "--port",
                str(port),
                "--executor-socket",
                str(sock),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )
    try:
        wait_healthy(proc, url, log_path, 300)
        r = requests.post(
            f"{url}/generate",
            json={"inputs": "What is the capital of France?", "parameters": {"max_new_tokens": 12}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["generated_text"], r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
