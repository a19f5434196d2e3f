"""The committed Python stubs must be exactly what the .proto generates."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_stubs_match_the_proto(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True, cwd=ROOT)
    committed = ROOT / "backends" / "trtllm" / "tensorgate" / "v1"
    for name in ("executor_pb2.py", "executor_pb2.pyi", "executor_pb2_grpc.py"):
        fresh = (tmp_path / "tensorgate" / "v1" / name).read_text()
        assert fresh == (committed / name).read_text(), f"{name} is stale: run scripts/gen-proto"
