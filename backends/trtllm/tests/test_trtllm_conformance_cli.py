"""`python -m tensorgate.conformance`, the check a user runs inside the TensorRT-LLM container:
here against the synthetic engine and the TEST DOUBLES of TensorRT-LLM (tests/doubles; NOT
TensorRT-LLM, so passing here says nothing about a GPU), and against engines that break the
contract, to show that its checks can fail."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import TRTLLM_ENGINES

from tensorgate import conformance
from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(120)

SMALL = ["--max-total-tokens", "128", "--max-input-tokens", "64"]


def run(argv) -> tuple[int, str]:
    out = io.StringIO()
    code = conformance.main(argv, out=out)
    return code, out.getvalue()


def test_the_synthetic_engine_passes_as_a_command():
    proc = subprocess.run(
        [sys.executable, "-m", "tensorgate.conformance", "--engine", "synthetic",
         "--iteration-ms", "2", *SMALL],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS lengths" in proc.stdout and "all checks passed" in proc.stdout


def test_an_engine_directory_on_the_executor_double(trtllm_double, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    trtllm_double.TEST_DOUBLE.iteration_ms = 1
    code, out = run(
        ["--engine", "trtllm", "--model-id", str(TRTLLM_ENGINES / "llama-tp1-bf16"), *SMALL]
    )
    assert code == 0, out
    for check in ("greedy_is_deterministic", "seed", "logprobs", "stop_token", "cancel"):
        assert f"PASS {check}" in out


def test_a_checkpoint_on_the_llm_api_double(llmapi_double, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    code, out = run(["--engine", "trtllm", "--model-id", str(tiny_llama_dir), *SMALL, "--json"])
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["passed"], out
    outcomes = {c["check"]: c["outcome"] for c in summary["checks"]}
    assert outcomes["logprobs"] == outcomes["stop_token"] == "pass"
    assert llmapi_double.TEST_DOUBLE.llms  # it ran on the LLM API flavour


def test_an_engine_that_does_not_load_exits_2(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    code, out = run(["--engine", "trtllm", "--model-id", str(TRTLLM_ENGINES / "llama-tp1-bf16")])
    assert code == 2 and "FAIL load" in out and "nvcr.io/nvidia/tensorrt-llm" in out


class _OneShort(SyntheticEngine):
    """Breaks the contract: drops the last token of every request that asks for 3 or more."""

    def submit(self, requests):
        for r in requests:
            if r.max_new_tokens >= 3:
                r.max_new_tokens -= 1
        super().submit(requests)


class _DeafToCancel(SyntheticEngine):
    def cancel(self, request_ids):
        pass


@pytest.mark.parametrize(
    ("engine_cls", "failing"), [(_OneShort, "check_lengths"), (_DeafToCancel, "check_cancel")]
)
def test_checks_fail_on_an_engine_that_breaks_the_contract(engine_cls, failing):
    engine = engine_cls(iteration_ms=1, max_batch_size=8, max_input_tokens=32, max_total_tokens=64)
    outputs = conformance.Outputs()
    engine.start(outputs.emit)
    check = conformance.Conformance(engine, outputs, timeout=5)
    try:
        passed = check.run_all(lambda *a: None)
    finally:
        engine.shutdown()
    assert not passed
    outcome = {name: o for name, o, _ in check.results}
    assert outcome[failing] == "fail"
    assert outcome["check_info"] == "pass"


def test_a_request_finishing_twice_is_caught():
    outputs = conformance.Outputs()
    batch = pb.IterationOutput()
    batch.outputs.add(request_id=1, token_ids=[5], finish_reason=pb.FINISH_REASON_LENGTH)
    outputs.emit(batch)
    outputs.emit(batch)
    assert outputs.after_end == [1]
