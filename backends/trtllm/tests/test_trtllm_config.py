"""Reading a TensorRT-LLM engine directory's config.json (fixtures shaped like trtllm-build
output; no TensorRT-LLM needed)."""

from __future__ import annotations

import json

import pytest
from conftest import TRTLLM_ENGINES, make_trtllm_engine_dir

from tensorgate.executor.engine import EngineError, EngineLimits
from tensorgate.executor.engines.trtllm_config import (
    LimitOverrides,
    check_gpus,
    load_engine_config,
    visible_gpu_count,
)
from tensorgate.launcher.model_source import is_trtllm_engine_dir


def test_llama_tp1_bf16():
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-tp1-bf16")
    assert cfg.architecture == "LlamaForCausalLM"
    assert cfg.dtype == "bfloat16"
    assert cfg.vocab_size == 128256
    assert cfg.quant_algo is None
    assert (cfg.mapping.world_size, cfg.mapping.tp_size, cfg.mapping.pp_size) == (1, 1, 1)
    assert (cfg.max_batch_size, cfg.max_input_len, cfg.max_seq_len) == (64, 4096, 8192)
    assert (cfg.max_num_tokens, cfg.max_beam_width, cfg.tokens_per_block) == (8192, 1, 32)
    # The executor's prompt limit, not build_config.max_input_len (4096): with context FMHA and
    # packed input it is min(max_seq_len - 1, max_num_tokens) (trtGptModelInflightBatching.cpp).
    assert cfg.limits() == EngineLimits(
        max_batch_size=64,
        max_input_tokens=8191,
        max_total_tokens=8192,
        max_num_tokens=8192,
        max_top_n_tokens=0,
    )


def test_llama_tp2():
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-tp2")
    assert (cfg.mapping.world_size, cfg.mapping.tp_size, cfg.mapping.pp_size) == (2, 2, 1)
    assert [p.name for p in cfg.engine_files()] == ["rank0.engine", "rank1.engine"]
    assert cfg.limits().max_batch_size == 128


def test_llama_fp8():
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-fp8")
    assert cfg.quant_algo == "FP8"
    assert cfg.kv_cache_quant_algo == "FP8"
    assert cfg.limits().max_total_tokens == 16384
    assert cfg.limits().max_input_tokens == 16383


@pytest.mark.parametrize("name", ["llama-tp1-bf16", "llama-tp2", "llama-fp8"])
def test_fixtures_are_recognised_as_engine_dirs(name):
    assert is_trtllm_engine_dir(TRTLLM_ENGINES / name)


def test_overrides_tighten_and_input_leaves_room_for_one_token():
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-tp1-bf16")
    limits = cfg.limits(LimitOverrides(max_batch_size=8, max_total_tokens=1024))
    assert limits.max_batch_size == 8
    assert limits.max_total_tokens == 1024
    assert limits.max_input_tokens == 1023  # min(executor's 8191, 1024 - 1)
    limits = cfg.limits(LimitOverrides(max_input_tokens=100))
    assert limits.max_input_tokens == 100


@pytest.mark.parametrize(
    ("plugin", "build", "chunked", "expected"),
    [
        # Chunked context: max_seq_len - 1, whatever max_num_tokens is.
        ({}, {"max_num_tokens": 2048}, True, 8191),
        # Context FMHA + packed input: min(max_seq_len - 1, max_num_tokens).
        ({}, {"max_num_tokens": 2048}, False, 2048),
        ({}, {}, False, 8191),
        # Neither: build_config.max_input_len.
        ({"context_fmha": False}, {"max_num_tokens": 2048}, False, 4096),
        ({"remove_input_padding": False}, {}, False, 4096),
    ],
)
def test_the_prompt_limit_is_the_executors(tmp_path, plugin, build, chunked, expected):
    d = make_trtllm_engine_dir(tmp_path, **build)
    data = json.loads((d / "config.json").read_text())
    data["build_config"]["plugin_config"].update(plugin)
    (d / "config.json").write_text(json.dumps(data))
    cfg = load_engine_config(d)
    assert cfg.executor_max_input_len(chunked) == expected
    assert cfg.limits(chunked_context=chunked).max_input_tokens == expected


def test_paged_context_fmha_is_read(tmp_path):
    assert load_engine_config(TRTLLM_ENGINES / "llama-tp1-bf16").paged_context_fmha
    d = make_trtllm_engine_dir(tmp_path)
    data = json.loads((d / "config.json").read_text())
    del data["build_config"]["plugin_config"]["use_paged_context_fmha"]
    (d / "config.json").write_text(json.dumps(data))
    assert not load_engine_config(d).paged_context_fmha  # absent: never assumed


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        (LimitOverrides(max_batch_size=65), "--max-batch-size 65"),
        (LimitOverrides(max_total_tokens=9000), "--max-total-tokens 9000"),
        (LimitOverrides(max_input_tokens=8192), "--max-input-tokens 8192"),
    ],
)
def test_overrides_cannot_widen_the_engine(overrides, flag):
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-tp1-bf16")
    with pytest.raises(EngineError, match=flag) as e:
        cfg.limits(overrides)
    assert "config.json" in str(e.value)


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(EngineError, match="not a directory"):
        load_engine_config(tmp_path / "nope")
    with pytest.raises(EngineError, match=r"config\.json does not exist") as e:
        load_engine_config(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_malformed_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON") as e:
        load_engine_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_a_hugging_face_config_is_not_an_engine(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(EngineError, match="pretrained_config is missing"):
        load_engine_config(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch_size", "64", r"build_config\.max_batch_size must be an integer"),
        ("max_input_len", 0, r"build_config\.max_input_len must be at least 1"),
        ("max_num_tokens", None, r"build_config\.max_num_tokens must be an integer"),
        ("max_beam_width", True, r"build_config\.max_beam_width must be an integer"),
    ],
)
def test_bad_build_config_fields_are_named(tmp_path, field, value, message):
    d = make_trtllm_engine_dir(tmp_path, **{field: value})
    with pytest.raises(EngineError, match=message) as e:
        load_engine_config(d)
    assert str(d / "config.json") in str(e.value)


def test_old_builds_with_max_output_len(tmp_path):
    d = make_trtllm_engine_dir(tmp_path, max_seq_len=None, max_output_len=1024)
    cfg = load_engine_config(d)
    assert cfg.max_seq_len == 4096 + 1024
    d2 = make_trtllm_engine_dir(tmp_path / "b", max_seq_len=None)
    with pytest.raises(EngineError, match=r"build_config\.max_seq_len is missing"):
        load_engine_config(d2)


def _edit_pretrained(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in fields.items():
        if v is None:
            cfg["pretrained_config"].pop(k, None)
        else:
            cfg["pretrained_config"][k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_bad_pretrained_config_fields_are_named(tmp_path):
    d = make_trtllm_engine_dir(tmp_path)
    _edit_pretrained(d, vocab_size=-1)
    with pytest.raises(EngineError, match=r"pretrained_config\.vocab_size must be at least 1"):
        load_engine_config(d)
    _edit_pretrained(d, vocab_size=32000, architecture=None)
    with pytest.raises(EngineError, match=r"pretrained_config\.architecture"):
        load_engine_config(d)
    _edit_pretrained(d, architecture="LlamaForCausalLM", mapping=None)
    with pytest.raises(EngineError, match=r"pretrained_config\.mapping is missing"):
        load_engine_config(d)


def test_inconsistent_world_size(tmp_path):
    d = make_trtllm_engine_dir(tmp_path, source="llama-tp2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["pretrained_config"]["mapping"]["world_size"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match=r"world_size is 4 but tp_size\*pp_size\*cp_size"):
        load_engine_config(d)


def test_missing_rank_engine_file(tmp_path):
    d = make_trtllm_engine_dir(tmp_path, source="llama-tp2")
    (d / "rank1.engine").unlink()
    with pytest.raises(EngineError, match=r"rank1\.engine is missing") as e:
        load_engine_config(d)
    assert "tp_size 2" in str(e.value)


def test_world_size_must_fit_the_visible_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-tp2")
    with pytest.raises(EngineError, match=r"world_size 2 .* shows 1 GPU") as e:
        check_gpus(cfg, lambda: 1)
    assert "tp_size 2" in str(e.value) and "config.json" in str(e.value)
    assert check_gpus(cfg, lambda: 2) == 2
    assert check_gpus(cfg, lambda: 8) == 8  # more GPUs than ranks: TensorRT-LLM uses the first
    one = load_engine_config(TRTLLM_ENGINES / "llama-tp1-bf16")
    with pytest.raises(EngineError, match="shows 0 GPU"):
        check_gpus(one, lambda: 0)


def test_gpu_error_names_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    cfg = load_engine_config(TRTLLM_ENGINES / "llama-tp2")
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES='3'"):
        check_gpus(cfg, lambda: visible_gpu_count())


@pytest.mark.parametrize(
    ("value", "count"),
    [
        ("0", 1),
        ("0,1", 2),
        ("0, 1, 2,3", 4),
        ("", 0),
        ("-1", 0),
        ("0,-1,2", 1),
        ("NoDevFiles", 0),
        ("GPU-8c2f1e5e-aaaa,GPU-11111111-bbbb", 2),
    ],
)
def test_visible_gpu_count_from_cuda_visible_devices(value, count):
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": value}) == count


def test_visible_gpu_count_without_the_variable_reads_the_driver_list():
    # Whatever this machine has; never raises and never initialises CUDA.
    assert visible_gpu_count({}) >= 0
