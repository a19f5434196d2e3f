"""Rollout control on the transformers engine with the embedded model (SmolLM2-135M-Instruct,
CPU), through the real gRPC server: weight updates from safetensors, pickles and a checkpoint
directory reproduce `model.generate` with those weights token for token; bad updates change
nothing; memory release frees resident memory and resume restores exactly the weights of the
moment; an in-place pause holds steps; final outputs carry the weight version."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import re
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import save
from test_server import Stream, connect

from tensorgate.executor.engines import load_engine
from tensorgate.executor.engines.transformers_control import resident_bytes
from tensorgate.executor.server import serve
from tensorgate.executor.settings import EngineConfig, ExecutorSettings
from tensorgate.models.embedded import ensure_embedded_model
from tensorgate.v1 import executor_pb2 as pb
from tensorgate.v1 import executor_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(600)

PROMPT = [1, 504, 3125, 314, 253, 1603, 29]
NEW = 12
PERTURBED = "model.layers.5.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model_dir():
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def executor(model_dir, tmp_path_factory):
    sock = tmp_path_factory.mktemp("rl") / "executor.sock"
    settings = ExecutorSettings(device="cpu", max_batch_size=4, max_total_tokens=512)
    engine = load_engine(EngineConfig("transformers", model_dir=model_dir, settings=settings))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(serve(engine, sock, None, stop),), daemon=True
    )
    thread.start()
    channel = connect(sock, timeout=60)
    yield pb_grpc.ExecutorStub(channel), engine
    channel.close()
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    """A plain transformers model, for model.generate with the same weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_state(reference):
    return {k: v.detach().clone() for k, v in reference.state_dict().items()}


@pytest.fixture(autouse=True)
def base_weights(executor, reference, base_state):
    """Every test starts from the checkpoint's weights in both models, awake and unpaused."""
    stub, _ = executor
    stub.ContinueGeneration(pb.ContinueGenerationRequest())
    stub.ResumeMemory(pb.MemoryRequest())
    load_state(reference, base_state)
    state = {k: v for k, v in base_state.items() if k != "lm_head.weight"}
    stub.UpdateWeights(
        pb.UpdateWeightsRequest(
            tensors=pb.SerializedTensors(payloads=[save(state)]),
            weight_version="base",
            flush_cache=True,
        )
    )
    yield


def load_state(model, state) -> None:
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            if k in state:
                v.copy_(state[k])


_ids = iter(range(1, 1_000_000))


def generate(stub, n: int = NEW, prompt=PROMPT) -> tuple[list[int], pb.RequestOutput]:
    """Greedy, through the gRPC stream: (tokens, final output)."""
    rid = next(_ids)
    stream = Stream(stub)
    req = pb.GenerateRequest(id=rid, input_ids=prompt, max_new_tokens=n, ignore_eos=True)
    stream.send(pb.GenerateCommand(requests=[req]))
    final = None
    for it in stream.calls:
        for o in it.outputs:
            stream.tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason:
                final = o
        if final is not None:
            break
    stream.send(None)
    return stream.tokens.get(rid, []), final


def expected(reference, n: int = NEW, prompt=PROMPT) -> list[int]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n
        )
    return out[0, len(prompt) :].tolist()


def perturbed(base_state, name: str = PERTURBED, factor: float = 1.6) -> dict:
    state = {k: v for k, v in base_state.items() if k != "lm_head.weight"}
    state[name] = base_state[name] * factor
    return state


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_base_weights_match_generate(executor, reference):
    stub, _ = executor
    tokens, final = generate(stub)
    assert tokens == expected(reference)
    assert final.weight_version == "base"


def test_update_from_safetensors_matches_generate_with_those_weights(
    executor, reference, base_state
):
    stub, _ = executor
    before = generate(stub)[0]
    state = perturbed(base_state)
    r = stub.UpdateWeights(
        pb.UpdateWeightsRequest(
            tensors=pb.SerializedTensors(format="safetensors", payloads=[save(state)]),
            flush_cache=True,
        )
    )
    assert r.tensors_updated == len(state)
    assert r.weight_version.isdigit(), "no label named: the count of applied updates"
    load_state(reference, state)
    tokens, final = generate(stub)
    assert tokens == expected(reference)
    assert tokens != before, "the perturbation must change the output, or this proves nothing"
    assert final.weight_version == r.weight_version


def test_update_from_a_pickle_in_buckets_and_under_the_tied_name(executor, reference, base_state):
    stub, _ = executor
    # lm_head.weight is embed_tokens.weight in this model (tie_word_embeddings): either name
    # updates the one tensor.
    embed = base_state["model.embed_tokens.weight"] * 0.9
    layer = base_state[PERTURBED] * 1.4
    buckets = [pickle.dumps([("lm_head.weight", embed)]), pickle.dumps({PERTURBED: layer})]
    r = stub.UpdateWeights(
        pb.UpdateWeightsRequest(
            tensors=pb.SerializedTensors(format="pickle", payloads=buckets),
            weight_version="pickled",
            flush_cache=True,
        )
    )
    assert (r.tensors_updated, r.weight_version) == (2, "pickled")
    load_state(reference, {"model.embed_tokens.weight": embed, PERTURBED: layer})
    tokens, final = generate(stub)
    assert tokens == expected(reference)
    assert final.weight_version == "pickled"


def test_update_from_a_checkpoint_directory(executor, reference, base_state, tmp_path):
    stub, _ = executor
    state = perturbed(base_state, "model.layers.2.self_attn.o_proj.weight", 0.5)
    load_state(reference, state)
    reference.save_pretrained(tmp_path / "ckpt")
    r = stub.UpdateWeights(
        pb.UpdateWeightsRequest(model_path=str(tmp_path / "ckpt"), flush_cache=True)
    )
    assert r.tensors_updated == len(state)
    assert generate(stub)[0] == expected(reference)


def test_bad_updates_change_nothing_and_say_why(executor, reference, base_state, tmp_path):
    stub, engine = executor
    tokens_before, final_before = generate(stub)
    probe = engine.model.state_dict()[PERTURBED].clone()
    good = base_state[PERTURBED] * 2.0
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {
        "shape": save({PERTURBED: good, "model.norm.weight": torch.ones(7)}),
        "name": save({PERTURBED: good, "model.layers.99.mlp.up_proj.weight": torch.ones(2)}),
        "dtype": save({PERTURBED: good, "model.norm.weight": torch.ones(576).bfloat16()}),
    }
    messages = {
        "shape": "'model.norm.weight': shape [7], the model's is [576]",
        "name": "'model.layers.99.mlp.up_proj.weight': the model has no tensor of that name",
        "dtype": "'model.norm.weight': dtype bfloat16, the model's is float32",
    }
    for case, payload in cases.items():
        code, details = refused(
            lambda p=payload: stub.UpdateWeights(
                pb.UpdateWeightsRequest(tensors=pb.SerializedTensors(payloads=[p]))
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, case
        assert messages[case] in details and "nothing was changed" in details, details
    hostile = pickle.dumps([(PERTURBED, good), ("x", Hostile())])
    code, details = refused(
        lambda: stub.UpdateWeights(
            pb.UpdateWeightsRequest(
                tensors=pb.SerializedTensors(format="pickle", payloads=[hostile])
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "posix.system" in details and "not admitted" in details
    assert not marker.exists(), "the hostile pickle ran"
    assert torch.equal(engine.model.state_dict()[PERTURBED], probe), "a weight was written"
    tokens, final = generate(stub)
    assert tokens == tokens_before
    assert final.weight_version == final_before.weight_version == "base"


def test_cuda_ipc_on_a_cpu_engine_is_refused_naming_why(executor):
    stub, _ = executor
    code, details = refused(
        lambda: stub.UpdateWeights(
            pb.UpdateWeightsRequest(cuda_ipc=pb.CudaIpcWeights(handles_by_gpu={"GPU-0": b"x"}))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "runs on cpu" in details and "CUDA" in details


def test_release_frees_resident_memory_and_resume_restores_the_same_weights(
    executor, reference, base_state
):
    stub, _ = executor
    state = perturbed(base_state, factor=0.7)  # updated weights must survive the round trip
    stub.UpdateWeights(
        pb.UpdateWeightsRequest(tensors=pb.SerializedTensors(payloads=[save(state)]))
    )
    load_state(reference, state)
    want = expected(reference)
    assert generate(stub)[0] == want
    gc.collect()
    rss_before = resident_bytes()
    r = stub.ReleaseMemory(pb.MemoryRequest(tags=["kv_cache", "model"]))
    rss_after = resident_bytes()
    assert list(r.released_memory_tags) == ["kv_cache", "model"]
    weights = sum(v.numel() * 4 for k, v in base_state.items() if k != "lm_head.weight")
    # The weights (~513 MiB in fp32) leave the resident set, measured here and by the engine.
    assert rss_before - rss_after > 0.8 * weights, (rss_before, rss_after)
    assert r.memory_delta_bytes > 0.8 * weights
    print(f"released: {r.message}; this process's RSS {rss_before >> 20} -> {rss_after >> 20} MiB")
    tokens, final = generate(stub)
    assert tokens == [] and final.finish_reason == pb.FINISH_REASON_ERROR
    assert "memory is released (kv_cache, model)" in final.error
    code, details = refused(
        lambda: stub.UpdateWeights(
            pb.UpdateWeightsRequest(tensors=pb.SerializedTensors(payloads=[save(state)]))
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "resume 'model'" in details
    assert list(stub.Info(pb.InfoRequest()).released_memory_tags) == ["kv_cache", "model"]
    assert stub.Health(pb.HealthRequest()).ready, "released on request is not a failure"
    r = stub.ResumeMemory(pb.MemoryRequest(tags=["model", "kv_cache"]))
    assert list(r.released_memory_tags) == []
    print(f"resumed: {r.message}")
    assert generate(stub)[0] == want


def test_a_release_ends_live_requests_with_a_clear_error(executor):
    stub, _ = executor
    stream = Stream(stub)
    req = pb.GenerateRequest(id=777_001, input_ids=PROMPT, max_new_tokens=400, ignore_eos=True)
    stream.send(pb.GenerateCommand(requests=[req]))
    stream.read_until(lambda: len(stream.tokens.get(777_001, [])) >= 2)
    stub.ReleaseMemory(pb.MemoryRequest(tags=["kv_cache"]))
    stream.read_until(lambda: 777_001 in stream.finish)
    assert stream.finish[777_001] == pb.FINISH_REASON_ERROR
    assert "memory was released (kv_cache)" in stream.errors[777_001]
    stream.send(None)
    stub.ResumeMemory(pb.MemoryRequest(tags=["kv_cache"]))


def test_pause_in_place_holds_steps_keeps_the_request_and_an_update_applies(
    executor, reference, base_state
):
    stub, engine = executor
    stream = Stream(stub)
    rid = 888_001
    req = pb.GenerateRequest(id=rid, input_ids=PROMPT, max_new_tokens=40, ignore_eos=True)
    stream.send(pb.GenerateCommand(requests=[req]))
    stream.read_until(lambda: len(stream.tokens.get(rid, [])) >= 3)
    r = stub.PauseGeneration(pb.PauseGenerationRequest())
    assert "paused in place" in r.message
    steps = engine.counters.iterations
    time.sleep(1.0)
    assert engine.counters.iterations == steps, "the engine stepped while paused"
    assert stub.Stats(pb.StatsRequest()).active_requests == 1, "the request is kept"
    code, _ = refused(lambda: stub.ReleaseMemory(pb.MemoryRequest()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # SGLang's pattern: pause in place, update, continue. The request ends on the new weights.
    state = perturbed(base_state)
    stub.UpdateWeights(
        pb.UpdateWeightsRequest(
            tensors=pb.SerializedTensors(payloads=[save(state)]), weight_version="mid"
        )
    )
    assert stub.ContinueGeneration(pb.ContinueGenerationRequest()).message == "continued"
    final = {}

    def done():
        return rid in stream.finish

    for it in stream.calls:
        for o in it.outputs:
            stream.tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason:
                stream.finish[o.request_id] = o.finish_reason
                final[o.request_id] = o
        if done():
            break
    stream.send(None)
    assert stream.finish[rid] == pb.FINISH_REASON_LENGTH
    assert len(stream.tokens[rid]) == 40
    assert final[rid].weight_version == "mid"


def test_flush_cache_reports_what_it_dropped(executor):
    stub, _ = executor
    stub.FlushCache(pb.FlushCacheRequest())
    generate(stub, n=4, prompt=PROMPT * 20)  # 140 tokens: two whole blocks stay cached after it
    r = stub.FlushCache(pb.FlushCacheRequest())
    dropped = int(re.search(r"(\d+) cached block\(s\) dropped", r.message).group(1))
    assert dropped >= 2, r.message
    again = stub.FlushCache(pb.FlushCacheRequest())
    assert "0 cached block(s) dropped" in again.message
