"""Rollout control measured at the executor: a real `python -m tensorgate.executor` process with
the transformers engine on the embedded model (SmolLM2-135M, CPU, default settings), driven by a
gRPC client in this process, as the router drives it.

Measures, per trial: the UpdateWeights RPC's wall time for the whole model as safetensors and as
a pickle (and the engine's own apply time, from its reply), and the executor process's resident
set around ReleaseMemory / ResumeMemory of kv_cache, model and both (read from /proc/PID/statm,
besides what the engine reports in memory_delta_bytes).

    python benchmarks/rl_control_executor.py [--trials 3] [--json out.json] [--model-id DIR]

--model-id serves another checkpoint of *.safetensors (e.g. one of the same shape with random
weights, where the embedded model cannot be installed).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from safetensors.torch import load_file, save

from tensorgate.models.embedded import ensure_embedded_model
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_executor(model: Path, sock: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tensorgate.executor",
        "--engine",
        "transformers",
        "--model-id",
        str(model),
        "--device",
        "cpu",
        "--uds-path",
        str(sock),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(stub, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.Health(pb.HealthRequest(), timeout=2).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise SystemExit("the executor did not get ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model-id", type=Path, help="default: the embedded model")
    args = ap.parse_args()
    model = args.model_id or ensure_embedded_model()
    state = {}
    for f in sorted(model.glob("*.safetensors")):
        state.update(load_file(str(f)))
    size = sum(v.numel() * v.element_size() for v in state.values())
    payloads = {"safetensors": save(state), "pickle": pickle.dumps(state)}
    with tempfile.TemporaryDirectory() as d:
        sock = Path(d) / "executor.sock"
        proc = start_executor(model, sock)
        try:
            while not sock.exists():
                time.sleep(0.2)
            channel = grpc.insecure_channel(f"unix:{sock}")
            stub = pb_grpc.ExecutorStub(channel)
            wait_ready(stub)
            results: dict[str, list] = {}
            for _ in range(args.trials):
                for fmt, payload in payloads.items():
                    started = time.monotonic()
                    r = stub.UpdateWeights(
                        pb.UpdateWeightsRequest(
                            tensors=pb.SerializedTensors(format=fmt, payloads=[payload]),
                            flush_cache=True,
                        )
                    )
                    rpc_ms = (time.monotonic() - started) * 1000
                    apply_ms = float(r.message.split(" in ")[1].split(" ms")[0])
                    results.setdefault(f"update {fmt}", []).append((rpc_ms, apply_ms))
                for tags in (["kv_cache"], ["model"], ["kv_cache", "model"]):
                    key = "+".join(tags)
                    before = rss(proc.pid)
                    r = stub.ReleaseMemory(pb.MemoryRequest(tags=tags))
                    after = rss(proc.pid)
                    back = stub.ResumeMemory(pb.MemoryRequest(tags=tags))
                    resumed = rss(proc.pid)
                    results.setdefault(f"release {key}", []).append(
                        (
                            before - after,
                            r.memory_delta_bytes,
                            resumed - after,
                            -back.memory_delta_bytes,
                        )
                    )
            report = {"model_bytes": size, "trials": args.trials, "results": results}
            print(f"{model.name}: {size / 2**20:.1f} MiB of weights, CPU, {args.trials} trials")
            for key, rows in results.items():
                if key.startswith("update"):
                    rpc = statistics.median(r[0] for r in rows)
                    apply = statistics.median(r[1] for r in rows)
                    print(
                        f"{key:24s} RPC {rpc:7.0f} ms (median; {size / 2**30 / (rpc / 1000):.2f} "
                        f"GiB/s), engine apply {apply:6.0f} ms"
                    )
                else:
                    freed = statistics.median(r[0] for r in rows) / 2**20
                    said = statistics.median(r[1] for r in rows) / 2**20
                    taken = statistics.median(r[2] for r in rows) / 2**20
                    print(
                        f"{key:24s} executor RSS -{freed:6.1f} MiB (engine says {said:6.1f}), "
                        f"resume +{taken:6.1f} MiB"
                    )
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
