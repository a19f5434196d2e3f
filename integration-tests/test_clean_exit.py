"""A stop is clean: after SIGTERM (to the launcher, as `docker stop` sends it) or SIGINT (to the
whole process group, as Ctrl-C in a terminal sends it) the server exits 0 and what it writes is
the launcher's, the router's and the executor's own shutdown lines, nothing else: no leak
reports or tracebacks from libraries at interpreter exit, no library's own log lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from conftest import free_port, wait_healthy

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The three processes' own INFO lines: the launcher and executor (Python logging's text format)
# and the router (tracing's).
OWN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tensorgate\.(launcher|executor)[\w.]*: "
    r"|^\d{4}-\d\d-\d\dT[\d:.]+Z +INFO tensorgate_router[\w:]*: "
)


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-launcher", "SIGINT-to-group"],
)
def test_a_stop_writes_only_the_servers_own_shutdown_lines(
    tmp_path: Path, embedded_model_dir: Path, sig: signal.Signals, to_group: bool
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sock = Path(tempfile.mkdtemp(prefix="tg-exit-")) / "executor.sock"
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorgate.cli",
                "serve",
                "--hostname",
                "127.0.0.1",
                "--port",
                str(port),
                "--executor-socket",
                str(sock),
            ],
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        wait_healthy(proc, url, err_path, 300)
        r = requests.post(
            f"{url}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        before = err_path.stat().st_size
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = err_path.read_bytes()
    after = ANSI.sub("", stderr[before:].decode("utf-8", "replace"))
    assert code == 0, stderr.decode("utf-8", "replace")
    lines = [line for line in after.splitlines() if line.strip()]
    foreign = [line for line in lines if not OWN_LINE.match(line)]
    assert not foreign, "lines other than the server's own after the stop:\n" + "\n".join(foreign)
    text = "\n".join(lines)
    assert f"tensorgate.launcher: received {sig.name}, shutting down" in text, text
    assert re.search(r"tensorgate_router[\w:]*: drained", text), text
    assert "tensorgate.executor: shutting down" in text, text
    assert out_path.read_bytes() == b"", "the server wrote to stdout"
