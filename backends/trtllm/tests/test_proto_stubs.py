"""The committed Python stubs must be exactly what the .proto generates."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]


def test_stubs_match_the_proto(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True, cwd=ROOT)
    committed = ROOT / "backends" / "trtllm" / "tensorgate" / "v1"
    for name in ("executor_pb2.py", "executor_pb2.pyi", "executor_pb2_grpc.py"):
        fresh = (tmp_path / "tensorgate" / "v1" / name).read_text()
        assert fresh == (committed / name).read_text(), f"{name} is stale: run scripts/gen-proto"


def _declared(name: str) -> tuple[Version | None, Version | None]:
    """The (floor, pin) pyproject.toml declares for `name`, from its runtime or test needs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    for req in map(Requirement, lines):
        if req.name == name:
            floor = [Version(s.version) for s in req.specifier if s.operator == ">="]
            pin = [Version(s.version) for s in req.specifier if s.operator == "=="]
            return (floor[0] if floor else None, pin[0] if pin else None)
    raise AssertionError(f"{name} is not declared in pyproject.toml")


def test_stubs_demand_no_more_than_the_declared_floors():
    """The stubs refuse a grpcio older than their generator and a protobuf runtime older than
    their gencode: those versions are the declared floors, so that every allowed install
    imports them, and the pinned generator is the one that made them."""
    committed = ROOT / "backends" / "trtllm" / "tensorgate" / "v1"
    grpc_stub = (committed / "executor_pb2_grpc.py").read_text()
    grpc_needs = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub).group(1))
    pb_stub = (committed / "executor_pb2.py").read_text()
    pb_needs = Version(re.search(r"# Protobuf Python Version: (\S+)", pb_stub).group(1))
    assert _declared("grpcio")[0] == grpc_needs
    assert _declared("grpcio-tools")[1] == grpc_needs
    assert _declared("protobuf")[0] == pb_needs
