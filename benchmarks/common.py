"""Shared pieces of the benchmark harness: start a server, read process CPU, run aiperf."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads, children excluded."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                cmdline = (entry / "cmdline").read_bytes()
                out[int(entry.name)] = cmdline.replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return out


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    pids: dict[str, int]  # role -> pid, the processes whose CPU is reported

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def wait_http(
    url: str,
    proc: subprocess.Popen,
    path: str = "/health",
    timeout: float = 900,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-6000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not up after {timeout}s")


def parse_cpus(spec: str | None) -> set[int] | None:
    """A CPU list as taskset takes it ("0", "0,2", "1-3"); None or "" for no pinning."""
    if not spec:
        return None
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pinned(cpus: set[int] | None):
    """A preexec_fn that pins the child (and everything it starts) to `cpus`."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def start_tensorgate(
    port: int, extra: list[str], log: Path, cpus: set[int] | None = None
) -> Served:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorgate.cli", "serve", "--port", str(port), *extra],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=pinned(cpus),
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc, log=log)
    pids = {}
    for pid, cmd in children(proc.pid).items():
        if "-m tensorgate.router" in cmd or "tensorgate-router" in cmd:
            pids["router"] = pid
        elif "tensorgate.executor" in cmd:
            pids["executor"] = pid
    return Served(proc, url, pids)


def aiperf_binary() -> str:
    found = os.environ.get("AIPERF") or shutil.which("aiperf")
    if not found:
        raise SystemExit(
            "aiperf not found: install it (`pip install aiperf==0.13.0`, a separate venv is "
            "fine) and put it on PATH or set AIPERF=/path/to/aiperf"
        )
    return found


def run_aiperf(
    url: str,
    *,
    model: str,
    tokenizer: str,
    concurrency: int,
    requests_count: int,
    input_tokens: int,
    output_tokens: int,
    artifacts: Path,
    endpoint_type: str = "completions",
    extra: list[str] | None = None,
) -> dict:
    """One aiperf profile run (streaming); returns its summary metrics."""
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        aiperf_binary(),
        "profile",
        "--url",
        url,
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--endpoint-type",
        endpoint_type,
        "--streaming",
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(requests_count),
        "--warmup-request-count",
        str(min(concurrency, 32)),
        "--synthetic-input-tokens-mean",
        str(input_tokens),
        "--synthetic-input-tokens-stddev",
        "0",
        "--output-tokens-mean",
        str(output_tokens),
        "--output-tokens-stddev",
        "0",
        "--random-seed",
        "0",
        "--artifact-dir",
        str(artifacts),
        "--ui-type",
        "none",
        *(extra or []),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    found = sorted(artifacts.rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {artifacts}")
    return json.loads(found[-1].read_text())


def metric(summary: dict, name: str, stat: str) -> float:
    m = summary.get(name) or summary.get("records", {}).get(name)
    if m is None:
        raise KeyError(f"{name} not in the aiperf summary: {sorted(summary)}")
    return float(m[stat])


def write_results(args, rows: list[dict], summary: dict | None = None) -> None:
    """The run's arguments, rows and summary (if any) as JSON at `args.out`."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    if summary:
        doc["summary"] = summary
    args.out.write_text(json.dumps(doc))
