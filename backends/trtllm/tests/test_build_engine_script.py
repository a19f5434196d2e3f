"""scripts/build-engine: --help and its errors without TensorRT-LLM; the commands it runs
(checked with stand-in scripts, not TensorRT-LLM's tools)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "build-engine"


def run(*args: str, path: str = "/usr/bin:/bin", cwd: Path | None = None):
    env = dict(os.environ, PATH=path)
    env.pop("TRTLLM_EXAMPLES", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "generation_config.json").write_text('{"eos_token_id": 2}')
    return ckpt


def test_is_executable():
    assert os.access(SCRIPT, os.X_OK)


def test_help_works_without_tensorrt_llm():
    proc = run("--help")
    assert proc.returncode == 0
    for flag in (
        "--max-batch-size",
        "--max-input-len",
        "--max-seq-len",
        "--max-output-len",
        "--max-beam-width",
        "--tp-size",
        "--pp-size",
        "--dtype",
        "--output-dir",
        "--quantization",
    ):
        assert flag in proc.stdout


def test_missing_trtllm_build_is_a_clear_error(tmp_path):
    proc = run("--checkpoint", str(checkpoint(tmp_path)), "--output-dir", str(tmp_path / "e"))
    assert proc.returncode == 2
    assert "`trtllm-build` is not on PATH" in proc.stderr
    assert "nvcr.io/nvidia/tensorrt-llm/release" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_limits_are_refused(tmp_path):
    proc = run("--checkpoint", "x", "--output-dir", "y", "--max-input-len", "100",
               "--max-seq-len", "100")  # fmt: skip
    assert proc.returncode == 2
    assert "--max-seq-len must be larger" in proc.stderr
    proc = run("--checkpoint", "x", "--output-dir", "y", "--tp-size", "0")
    assert proc.returncode == 2 and "--tp-size must be at least 1" in proc.stderr


def _fake_tools(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-ins for convert_checkpoint.py and trtllm-build that log their arguments."""
    log = tmp_path / "calls.log"
    examples = tmp_path / "examples"
    convert = examples / "models" / "core" / "llama" / "convert_checkpoint.py"
    convert.parent.mkdir(parents=True)
    convert.write_text(
        f"import sys\nopen({str(log)!r}, 'a').write('convert ' + ' '.join(sys.argv[1:]) + '\\n')\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    build = bin_dir / "trtllm-build"
    build.write_text(
        "#!/bin/sh\n"
        f'echo build "$@" >> {log}\n'
        'while [ $# -gt 0 ]; do [ "$1" = --output_dir ] && mkdir -p "$2"; shift; done\n'
    )
    build.chmod(0o755)
    return examples, bin_dir


def test_builds_with_the_given_limits_and_copies_the_tokenizer(tmp_path):
    examples, bin_dir = _fake_tools(tmp_path)
    out = tmp_path / "engine"
    proc = run(
        "--checkpoint", str(checkpoint(tmp_path)), "--output-dir", str(out),
        "--max-batch-size", "8", "--max-input-len", "1024", "--max-seq-len", "2048",
        "--tp-size", "2", "--examples-dir", str(examples),
        path=f"{bin_dir}:/usr/bin:/bin",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[0].startswith("convert ")
    assert "--dtype float16" in calls[0]  # the checkpoint's torch_dtype
    assert "--tp_size 2 --pp_size 1" in calls[0]
    assert f"--output_dir {out}.ckpt" in calls[0]
    assert calls[1].startswith("build ")
    for part in (
        f"--checkpoint_dir {out}.ckpt",
        f"--output_dir {out}",
        "--max_batch_size 8",
        "--max_input_len 1024",
        "--max_seq_len 2048",
        "--max_beam_width 1",
        # Chunked context (and so streaming under max_utilization) needs it.
        "--use_paged_context_fmha enable",
    ):
        assert part in calls[1]
    assert (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()
    assert f"tensorgate serve --model-id {out}" in proc.stdout


def test_missing_examples_is_a_clear_error(tmp_path):
    _, bin_dir = _fake_tools(tmp_path)
    proc = run(
        "--checkpoint", str(checkpoint(tmp_path)), "--output-dir", str(tmp_path / "e"),
        "--examples-dir", str(tmp_path / "nowhere"),
        path=f"{bin_dir}:/usr/bin:/bin",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "convert_checkpoint.py" in proc.stderr and "--examples-dir" in proc.stderr


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_dry_run_prints_the_commands(tmp_path, quant):
    examples = tmp_path / "ex"
    for rel in ("models/core/llama/convert_checkpoint.py", "quantization/quantize.py"):
        (examples / rel).parent.mkdir(parents=True, exist_ok=True)
        (examples / rel).write_text("")
    proc = run(
        "--checkpoint", str(checkpoint(tmp_path)), "--output-dir", str(tmp_path / "e"),
        "--quantization", quant, "--examples-dir", str(examples), "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 2
    if quant == "fp8":
        assert "quantize.py" in lines[0] and "--qformat fp8 --kv_cache_dtype fp8" in lines[0]
    else:
        assert "convert_checkpoint.py" in lines[0]
    assert "trtllm-build" in lines[1]
