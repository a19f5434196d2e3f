"""Rollout control of the transformers engine on a CUDA device: a weight update from CUDA IPC
handles made by another process the way verl's trtllm rollout makes them
(`pickle.dumps([(name, reduce_tensor(param.detach()))])`), and memory release/resume measured in
CUDA allocated bytes. Needs a GPU: CUDA IPC handles cannot exist without one, so on a machine with
none these tests are skipped, saying so (they run on the lent GPU: docs/rl.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import Collector

from tensorgate.executor.control import ControlInvalid
from tensorgate.executor.engines.transformers_engine import TransformersEngine, TransformersSettings
from tensorgate.v1 import executor_pb2 as pb

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device"),
]

PROMPT = [1, 17, 42, 99, 3]
PERTURBED = "lm_head.weight"  # negated: greedy becomes argmin, certainly different

# The trainer: its own process, its weights on the GPU, the handles pickled as verl does
# (verl/workers/rollout/trtllm_rollout/trtllm_rollout.py, TRTLLMAsyncRollout.update_weights).
# It keeps the tensors alive until told to exit: the handles point into its memory.
PRODUCER = textwrap.dedent(
    """
    import pickle, sys, torch
    from safetensors.torch import load_file
    from torch.multiprocessing.reductions import reduce_tensor
    state = load_file(sys.argv[1] + "/model.safetensors", device="cuda")
    state[sys.argv[2]] = -state[sys.argv[2]]
    handles = [(n, reduce_tensor(t.detach())) for n, t in state.items()]
    uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
    data = pickle.dumps(handles)
    sys.stdout.buffer.write(uuid.encode() + b"\\n" + str(len(data)).encode() + b"\\n" + data)
    sys.stdout.buffer.flush()
    sys.stdin.readline()
    """
)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    collector = Collector()
    eng = TransformersEngine(
        tiny_llama_dir,
        TransformersSettings(device="cuda", dtype="float32", max_batch_size=4, block_size=32),
    )
    eng.start(collector.emit)
    eng.collector = collector
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def trainer(tiny_llama_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(tiny_llama_dir), PERTURBED],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    uuid = proc.stdout.readline().strip()
    size = int(proc.stdout.readline())
    handles = proc.stdout.read(size)
    assert len(handles) == size, "the producer sent no handles"
    yield uuid.decode(), handles
    proc.stdin.write(b"done\n")
    proc.stdin.close()
    proc.wait(timeout=30)


def greedy(engine, rid: int, n: int = 10) -> list[int]:
    engine.submit([pb.GenerateRequest(id=rid, input_ids=PROMPT, max_new_tokens=n, ignore_eos=True)])
    engine.collector.wait_finished([rid])
    return engine.collector.tokens[rid]


def test_update_from_another_processes_cuda_ipc_handles(engine, trainer, tiny_llama_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    uuid, handles = trainer
    assert engine.control_features().update_from_cuda_ipc
    before = greedy(engine, 1)
    with pytest.raises(ControlInvalid, match=f"no handles for this engine's GPU {uuid}"):
        engine.update_weights(
            pb.UpdateWeightsRequest(cuda_ipc=pb.CudaIpcWeights(handles_by_gpu={"GPU-x": b"x"}))
        )
    r = engine.update_weights(
        pb.UpdateWeightsRequest(cuda_ipc=pb.CudaIpcWeights(handles_by_gpu={uuid: handles}))
    )
    want = load_file(str(tiny_llama_dir / "model.safetensors"))
    want[PERTURBED] = -want[PERTURBED]
    assert r.tensors_updated == len(want)
    assert engine.weight_version == "0", "a bucket takes effect at finalize"
    got = engine.model.state_dict()
    for name, value in want.items():
        assert torch.equal(got[name].cpu(), value), name
    engine.update_weights(pb.UpdateWeightsRequest(finalize=True, weight_version="ipc-1"))
    assert engine.weight_version == "ipc-1"
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reference.load_state_dict(want, strict=False)
    reference = reference.cuda().eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([PROMPT], device="cuda"), max_new_tokens=10, do_sample=False
        )
    after = greedy(engine, 2)
    assert after == out[0, len(PROMPT) :].tolist()
    assert after != before


def test_release_and_resume_on_cuda_measure_allocated_bytes(engine):
    weights = sum(t.numel() * t.element_size() for t in engine.model.state_dict().values())
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    tokens = greedy(engine, 10)
    r = engine.release_memory(["model", "kv_cache"])
    assert r.memory_delta_bytes >= weights * 0.9, r.message
    print(r.message)
    r = engine.resume_memory([])
    assert -r.memory_delta_bytes >= weights * 0.9, r.message
    print(r.message)
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert greedy(engine, 11) == tokens
