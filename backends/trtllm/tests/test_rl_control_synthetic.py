"""Rollout control on the synthetic engine through the real gRPC server: the six RPCs, their
status codes, the state they keep (released tags, weight versions, in-place pause) and the
weight_version every final output carries."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time

import grpc
import pytest
from test_server import Stream, connect, request, served

from tensorgate.executor.engine import Engine
from tensorgate.executor.engines import load_engine
from tensorgate.executor.engines.synthetic import SyntheticEngine
from tensorgate.executor.server import serve
from tensorgate.executor.settings import EngineConfig, ExecutorSettings
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def executor(tmp_path):
    sock = tmp_path / "executor.sock"
    settings = ExecutorSettings(
        iteration_ms=5, max_batch_size=8, vocab_size=1000, weight_version="base"
    )
    engine = load_engine(EngineConfig("synthetic", settings=settings))
    with served(engine, sock) as (stub, thread):
        yield stub, engine
    assert not thread.is_alive()


def generate(stub, rid: int, n: int = 3) -> tuple[int, str, str]:
    """One request to its end: (finish reason, error, weight_version of the final output)."""
    stream = Stream(stub)
    stream.send(pb.GenerateCommand(requests=[request(rid, n)]))
    final: list[pb.RequestOutput] = []
    for it in stream.calls:
        final += [o for o in it.outputs if o.finish_reason]
        if final:
            break
    stream.send(None)
    (out,) = final
    return out.finish_reason, out.error, out.weight_version


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_info_carries_the_initial_weight_version_and_what_control_does(executor):
    stub, _ = executor
    info = stub.Info(pb.InfoRequest())
    assert info.weight_version == "base"
    assert list(info.control.memory_tags) == ["kv_cache", "model"]
    assert info.control.pause_in_place and info.control.update_from_tensors
    assert list(info.released_memory_tags) == []


def test_final_outputs_carry_the_weight_version_of_each_update(executor, tmp_path):
    stub, _ = executor
    assert generate(stub, 1)[2] == "base"
    r = stub.UpdateWeights(pb.UpdateWeightsRequest(model_path=str(tmp_path)))
    assert r.weight_version == "1"  # the count of applied updates when none is named
    assert generate(stub, 2) == (pb.FINISH_REASON_LENGTH, "", "1")
    r = stub.UpdateWeights(pb.UpdateWeightsRequest(model_path=str(tmp_path), weight_version="v7"))
    assert r.weight_version == "v7"
    assert generate(stub, 3)[2] == "v7"
    assert stub.Info(pb.InfoRequest()).weight_version == "v7"


def test_cuda_ipc_buckets_take_effect_at_finalize(executor):
    stub, _ = executor
    bucket = pb.UpdateWeightsRequest(
        cuda_ipc=pb.CudaIpcWeights(handles_by_gpu={"GPU-x": b"\x80\x04]\x94."}),
        weight_version="ignored on a bucket",
    )
    assert stub.UpdateWeights(bucket).weight_version == "base"
    assert stub.UpdateWeights(bucket).weight_version == "base"
    done = stub.UpdateWeights(pb.UpdateWeightsRequest(finalize=True, weight_version="step-1"))
    assert done.weight_version == "step-1"


def test_safetensors_headers_are_counted_and_bad_ones_refused(executor):
    stub, _ = executor
    good = safetensors_bytes({"a": ("F32", [2, 3]), "b": ("F32", [4])})
    r = stub.UpdateWeights(
        pb.UpdateWeightsRequest(tensors=pb.SerializedTensors(payloads=[good, good]))
    )
    assert r.tensors_updated == 4
    truncated = good[:-4]
    code, details = code_of(
        lambda: stub.UpdateWeights(
            pb.UpdateWeightsRequest(tensors=pb.SerializedTensors(payloads=[truncated]))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "data_offsets" in details
    code, details = code_of(
        lambda: stub.UpdateWeights(
            pb.UpdateWeightsRequest(tensors=pb.SerializedTensors(format="npz", payloads=[good]))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "npz" in details
    assert stub.Info(pb.InfoRequest()).weight_version == "1", "a refused update changes nothing"


def test_an_update_with_no_source_is_invalid(executor):
    stub, _ = executor
    code, details = code_of(lambda: stub.UpdateWeights(pb.UpdateWeightsRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no source" in details


def test_release_refuses_generation_until_resumed(executor):
    stub, _ = executor
    r = stub.ReleaseMemory(pb.MemoryRequest(tags=["kv_cache"]))
    assert list(r.released_memory_tags) == ["kv_cache"]
    reason, error, version = generate(stub, 10)
    assert reason == pb.FINISH_REASON_ERROR
    assert "released (kv_cache)" in error and "resume" in error
    assert version == "base"
    assert list(stub.Info(pb.InfoRequest()).released_memory_tags) == ["kv_cache"]
    r = stub.ResumeMemory(pb.MemoryRequest())  # empty: every tag
    assert list(r.released_memory_tags) == []
    assert generate(stub, 11)[0] == pb.FINISH_REASON_LENGTH


def test_trtllm_tags_are_accepted_and_unknown_ones_named(executor):
    stub, _ = executor
    # What verl's TRTLLMAsyncRollout.release() sends.
    verl_tags = [
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
    r = stub.ReleaseMemory(pb.MemoryRequest(tags=verl_tags))
    assert list(r.released_memory_tags) == ["kv_cache", "model"]
    assert "sampler" in r.message and "nothing to do" in r.message
    code, details = code_of(lambda: stub.ResumeMemory(pb.MemoryRequest(tags=["weights"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'weights'" in details and "kv_cache" in details
    stub.ResumeMemory(pb.MemoryRequest(tags=["kv_cache", "model"]))


def test_update_while_the_model_is_released_is_a_conflict(executor, tmp_path):
    stub, _ = executor
    stub.ReleaseMemory(pb.MemoryRequest(tags=["model"]))
    code, details = code_of(
        lambda: stub.UpdateWeights(pb.UpdateWeightsRequest(model_path=str(tmp_path)))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "resume 'model'" in details
    stub.ResumeMemory(pb.MemoryRequest(tags=["model"]))
    assert stub.UpdateWeights(pb.UpdateWeightsRequest(model_path=str(tmp_path))).weight_version


def test_a_release_fails_live_requests_with_a_clear_error(executor):
    stub, _ = executor
    stream = Stream(stub)
    stream.send(pb.GenerateCommand(requests=[request(20, 100_000 // 100)]))
    stream.read_until(lambda: len(stream.tokens.get(20, [])) >= 2)
    stub.ReleaseMemory(pb.MemoryRequest(tags=["kv_cache"]))
    stream.read_until(lambda: 20 in stream.finish)
    assert stream.finish[20] == pb.FINISH_REASON_ERROR
    assert "memory is released" in stream.errors[20]
    stream.send(None)
    stub.ResumeMemory(pb.MemoryRequest(tags=["kv_cache"]))


def test_pause_in_place_holds_steps_and_continue_resumes(executor):
    stub, engine = executor
    stream = Stream(stub)
    stream.send(pb.GenerateCommand(requests=[request(30, 200)]))
    stream.read_until(lambda: len(stream.tokens.get(30, [])) >= 2)
    assert stub.PauseGeneration(pb.PauseGenerationRequest()).message == "paused in place"
    iterations = engine.counters.iterations
    time.sleep(0.2)  # 40 iterations' worth at 5 ms
    assert engine.counters.iterations == iterations, "no step while paused"
    assert stub.Stats(pb.StatsRequest()).active_requests == 1, "the request is kept"
    # A release while paused would drop what the pause keeps.
    code, _ = code_of(lambda: stub.ReleaseMemory(pb.MemoryRequest()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.ContinueGeneration(pb.ContinueGenerationRequest()).message == "continued"
    stream.read_until(lambda: 30 in stream.finish)
    assert stream.finish[30] == pb.FINISH_REASON_LENGTH and len(stream.tokens[30]) == 200
    stream.send(None)
    assert stub.ContinueGeneration(pb.ContinueGenerationRequest()).message == "was not paused"


def test_a_cancel_while_paused_still_ends_the_request(executor):
    stub, _ = executor
    stream = Stream(stub)
    stream.send(pb.GenerateCommand(requests=[request(40, 500)]))
    stream.read_until(lambda: len(stream.tokens.get(40, [])) >= 1)
    stub.PauseGeneration(pb.PauseGenerationRequest())
    stream.send(pb.GenerateCommand(cancel_ids=[40]))
    stream.read_until(lambda: 40 in stream.finish)
    assert stream.finish[40] == pb.FINISH_REASON_CANCELLED
    stub.ContinueGeneration(pb.ContinueGenerationRequest())
    stream.send(None)


def test_flush_cache_drops_the_prefix_cache_model(executor):
    stub, engine = executor
    generate(stub, 41)  # its prompt has no full block: nothing cached
    assert "0 cached block(s) dropped" in stub.FlushCache(pb.FlushCacheRequest()).message
    engine.prefix.admit(list(range(1, 40)))  # two full blocks of 16
    assert "2 cached block(s) dropped" in stub.FlushCache(pb.FlushCacheRequest()).message
    assert len(engine.prefix) == 0


class _NoMemoryControl(SyntheticEngine):
    """The base Engine's release (what an engine without the feature answers) and an update
    that breaks inside the engine: the status codes the server maps them to."""

    release_memory = Engine.release_memory

    def update_weights(self, request):
        raise RuntimeError("device lost")


def test_unimplemented_and_internal_failures_are_named(tmp_path):
    sock = tmp_path / "executor.sock"
    engine = _NoMemoryControl(iteration_ms=5, max_batch_size=2, vocab_size=100)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(engine, sock, None, stop),), daemon=True
    )
    thread.start()
    channel = connect(sock)
    stub = pb_grpc.ExecutorStub(channel)
    try:
        code, details = code_of(lambda: stub.ReleaseMemory(pb.MemoryRequest()))
        assert code == grpc.StatusCode.UNIMPLEMENTED
        assert details == "the synthetic engine cannot release memory"
        code, details = code_of(lambda: stub.UpdateWeights(pb.UpdateWeightsRequest(finalize=True)))
        assert code == grpc.StatusCode.INTERNAL
        assert details == "UpdateWeights failed in the synthetic engine: RuntimeError: device lost"
        assert generate(stub, 1)[0] == pb.FINISH_REASON_LENGTH, "the executor still serves"
    finally:
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=20)
