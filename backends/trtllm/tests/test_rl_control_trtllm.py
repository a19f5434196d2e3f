"""Rollout control on the trtllm engine against the TEST DOUBLES of TensorRT-LLM (NOT
TensorRT-LLM, no GPU): the LLM API flavour makes trtllm-serve's calls (collective_rpc 'sleep',
'wakeup', 'update_weights', and 'reset_prefix_cache') with trtllm-serve's arguments, checks CUDA
IPC buckets itself before they reach TensorRT-LLM, and says what TensorRT-LLM cannot do; the
engine-directory flavour answers UNIMPLEMENTED with the reason."""

from __future__ import annotations

import base64
import json
import os
import pickle
import time

import pytest
from test_trtllm_engine import TP1
from test_trtllm_llmapi import EOS, req, run
from test_weights import Runs, ipc_args
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from tensorgate.executor.control import (
    ControlConflict,
    ControlError,
    ControlInvalid,
    ControlUnsupported,
)
from tensorgate.executor.engines.trtllm_engine import TrtllmEngine
from tensorgate.executor.engines.trtllm_llmapi import TrtllmLlmApiEngine
from tensorgate.executor.engines.trtllm_llmapi_config import LlmApiSettings
from tensorgate.v1 import executor_pb2 as pb

pytestmark = pytest.mark.timeout(60)

VERL_TAGS = [
    "sampler",
    "drafter",
    "guided_decoder",
    "spec_resource_manager",
    "model_extra",
    "executor_extra",
    "model",
    "draft_model",
    "kv_cache",
]


@pytest.fixture
def start(llmapi_double, collector, tmp_path):
    """LLM API engines over a checkpoint's config files (the double loads no weights)."""
    (tmp_path / "config.json").write_text(
        json.dumps({"vocab_size": 1000, "max_position_embeddings": 1024, "torch_dtype": "bfloat16"})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    engines = []

    def start(settings=None) -> TrtllmLlmApiEngine:
        engine = TrtllmLlmApiEngine(tmp_path, settings, gpu_count=lambda: 8)
        engine.start(collector.emit)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.shutdown()


def bucket(uuid: str, names=("model.layers.0.mlp.up_proj.weight",)) -> pb.UpdateWeightsRequest:
    """What the router sends for one trtllm-serve /update_weights bucket: the base64-decoded
    pickle of [(name, reduce_tensor(param))] per GPU, as verl builds it."""
    handles = [(n, (rebuild_cuda_tensor, ipc_args())) for n in names]
    return pb.UpdateWeightsRequest(
        cuda_ipc=pb.CudaIpcWeights(handles_by_gpu={uuid: pickle.dumps(handles)})
    )


def calls(llmapi_double) -> list[tuple[str, tuple]]:
    return list(llmapi_double.TEST_DOUBLE.rpc_calls)


def test_without_rl_hooks_every_call_says_to_start_with_them(start):
    engine = start()
    assert engine.control_features().memory_tags == ()
    for call in (
        lambda: engine.release_memory(["kv_cache"]),
        lambda: engine.resume_memory([]),
        lambda: engine.flush_cache(),
        lambda: engine.update_weights(pb.UpdateWeightsRequest(finalize=True)),
    ):
        with pytest.raises(ControlUnsupported, match="--rl-hooks"):
            call()


def test_release_and_resume_are_sleep_and_wakeup_with_the_tags(start, llmapi_double, collector):
    engine = start(LlmApiSettings(rl_hooks=True))
    llm = llmapi_double.TEST_DOUBLE.llms[-1]
    # LLM(orchestrator_type="ray", ray_worker_extension_cls=..., enable_sleep=True).
    assert llm.kwargs["orchestrator_type"] == "ray" and llm.kwargs["enable_sleep"] is True
    assert (
        llm.kwargs["ray_worker_extension_cls"] == "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
    )
    r = engine.release_memory(["model", "kv_cache"])
    assert calls(llmapi_double)[-1] == ("sleep", (["model", "kv_cache"],))
    assert llm.sleeping == {"model", "kv_cache"}
    assert "not measured" in r.message  # no CUDA in this process
    assert engine.released_memory_tags() == ["kv_cache", "model"]
    # Refused by the engine, never sent to a sleeping TensorRT-LLM.
    engine.submit([req(1)])
    collector.wait_finished([1])
    assert "memory is released (kv_cache, model)" in collector.errors[1]
    engine.resume_memory(["model", "kv_cache"])
    assert calls(llmapi_double)[-1] == ("wakeup", (["model", "kv_cache"],))
    assert llm.sleeping == set() and engine.released_memory_tags() == []
    run(engine, collector, req(2))
    assert collector.finish[2] == pb.FINISH_REASON_LENGTH


def test_no_tags_means_verls_full_set(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    engine.release_memory([])
    assert calls(llmapi_double)[-1] == ("sleep", (VERL_TAGS,))
    engine.resume_memory([])
    assert calls(llmapi_double)[-1] == ("wakeup", (VERL_TAGS,))


def test_a_tag_tensorrt_llm_does_not_know_is_invalid(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    with pytest.raises(ControlInvalid, match="'weights'"):
        engine.release_memory(["weights"])
    assert calls(llmapi_double) == [], "refused before TensorRT-LLM"
    engine.release_memory(["kv_cache"])
    assert engine.released_memory_tags() == ["kv_cache"]


def test_a_release_ends_live_requests_rather_than_wait_on_them(start, llmapi_double, collector):
    engine = start(LlmApiSettings(rl_hooks=True))
    llmapi_double.TEST_DOUBLE.iteration_ms = 20
    engine.submit([req(5, n=500, ignore_eos=True)])
    deadline = time.monotonic() + 10
    while not collector.tokens.get(5) and time.monotonic() < deadline:
        time.sleep(0.01)
    # sleep runs under control_action, which drains in-flight requests: the engine ends and
    # aborts them first, so the release does not wait 500 steps of 20 ms.
    engine.release_memory(["kv_cache"])
    collector.wait_finished([5])
    assert collector.finish[5] == pb.FINISH_REASON_ERROR
    assert "memory was released (kv_cache)" in collector.errors[5]


def test_update_weights_sends_base64_of_the_checked_bucket_then_finalizes(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    llm = llmapi_double.TEST_DOUBLE.llms[-1]
    uuid = llmapi_double.TEST_DOUBLE.device_uuid
    names = ("model.layers.0.mlp.up_proj.weight", "lm_head.weight")
    r = engine.update_weights(bucket(uuid, names))
    method, (sent,) = calls(llmapi_double)[-1]
    assert method == "update_weights"
    # As trtllm-serve passes request.weights: GPU UUID -> base64 text of the pickle.
    assert isinstance(sent[uuid], str)
    assert pickle.loads(base64.b64decode(sent[uuid]))[0][0] == names[0]
    assert llm.loaded_names == list(names)
    assert r.tensors_updated == 2 and engine.weight_version == "0"
    r = engine.update_weights(pb.UpdateWeightsRequest(finalize=True, weight_version="step-1"))
    assert calls(llmapi_double)[-1] == ("update_weights", (None,))
    assert llm.weights_version == 1 and llm.prefix_cache_resets == 1
    assert engine.weight_version == r.message.split("weights now ")[1].strip("'") == "step-1"


def test_a_bucket_for_another_gpu_is_tensorrt_llms_value_error(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    with pytest.raises(ControlInvalid, match="Device UUID GPU-double-0 not found"):
        engine.update_weights(bucket("GPU-other"))


def test_a_hostile_bucket_never_reaches_tensorrt_llm(start, llmapi_double, tmp_path):
    engine = start(LlmApiSettings(rl_hooks=True))
    uuid = llmapi_double.TEST_DOUBLE.device_uuid
    marker = tmp_path / "pwned"
    hostile = pickle.dumps([("w", Runs(os.system, f"touch {marker}"))])
    req_ = pb.UpdateWeightsRequest(cuda_ipc=pb.CudaIpcWeights(handles_by_gpu={uuid: hostile}))
    with pytest.raises(ControlInvalid, match=r"posix\.system"):
        engine.update_weights(req_)
    assert calls(llmapi_double) == [] and not marker.exists()


def test_what_tensorrt_llm_cannot_do_is_unimplemented_with_the_reason(start, tmp_path):
    engine = start(LlmApiSettings(rl_hooks=True))
    with pytest.raises(ControlUnsupported, match="only from CUDA IPC handles"):
        engine.update_weights(pb.UpdateWeightsRequest(model_path=str(tmp_path)))
    with pytest.raises(ControlUnsupported, match="cannot pause in place"):
        engine.pause_generation()
    assert not engine.control_features().pause_in_place


def test_update_while_the_model_is_released_is_a_conflict(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    engine.release_memory(["model"])
    with pytest.raises(ControlConflict, match="resume 'model'"):
        engine.update_weights(pb.UpdateWeightsRequest(finalize=True))


def test_flush_cache_resets_tensorrt_llms_prefix_cache(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    engine.flush_cache()
    assert calls(llmapi_double)[-1] == ("reset_prefix_cache", ())
    assert llmapi_double.TEST_DOUBLE.llms[-1].prefix_cache_resets == 1


def test_a_tensorrt_llm_failure_is_an_internal_error_naming_the_call(start, llmapi_double):
    engine = start(LlmApiSettings(rl_hooks=True))
    llm = llmapi_double.TEST_DOUBLE.llms[-1]

    def broken(*args):
        raise RuntimeError("CUDA error: out of memory")

    llm._rpc_wakeup = broken
    with pytest.raises(ControlError, match="TensorRT-LLM failed wakeup: RuntimeError: CUDA error"):
        engine.resume_memory(["kv_cache"])


def test_the_engine_directory_flavour_is_unimplemented_with_the_reason(trtllm_double):
    engine = TrtllmEngine(TP1, None, gpu_count=lambda: 8)
    try:
        for call in (
            lambda: engine.release_memory([]),
            lambda: engine.update_weights(pb.UpdateWeightsRequest(finalize=True)),
            lambda: engine.pause_generation(),
        ):
            with pytest.raises(ControlUnsupported, match="weights are compiled into it"):
                call()
        assert engine.describe("x").control == pb.ControlFeatures()
    finally:
        engine.shutdown()
