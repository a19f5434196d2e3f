"""Weight payloads (executor/weights.py, weights_pickle.py): the restricted unpickler refuses
every global but the tensor-rebuild functions, safetensors headers are checked before any tensor
is read, CUDA IPC buckets are checked without opening a handle, and the check against the model
lists every problem and passes nothing half-way."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess

import pytest
import torch
from safetensors.torch import save
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from tensorgate.executor.control import ControlInvalid
from tensorgate.executor.weights import (
    ModelTensors,
    check_tied,
    decode_safetensors,
    plan,
    safetensors_header,
)
from tensorgate.executor.weights_pickle import IpcHandle, decode_cuda_ipc, decode_pickle

BIG = 1 << 30


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tensors(model):
    return ModelTensors(model)


class Runs:
    """A pickle whose loading would call `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    ("func", "args", "named"),
    [
        (os.system, ("true",), "posix.system"),
        (eval, ("1",), "builtins.eval"),
        (subprocess.call, (["true"],), "subprocess.call"),
        (getattr, (int, "real"), "builtins.getattr"),
        (torch.load, ("/x",), "torch.serialization.load"),
    ],
)
def test_the_unpickler_refuses_any_other_global_by_name(func, args, named):
    payload = pickle.dumps([("w", Runs(func, *args))])
    with pytest.raises(ControlInvalid, match=rf"refers to {named}, which is not admitted"):
        decode_pickle(payload, budget=BIG)


def test_a_plain_pickle_of_tensors_and_parameters_decodes():
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    out = decode_pickle(pickle.dumps([("a", a), ("b", b)]), budget=BIG)
    assert [(i.name, i.shape, i.dtype) for i in out] == [
        ("a", (2, 3), torch.float32),
        ("b", (4,), torch.bfloat16),
    ]
    assert torch.equal(out[0].value, a) and torch.equal(out[1].value, b.detach())
    as_dict = decode_pickle(pickle.dumps({"a": a}), budget=BIG)
    assert as_dict[0].name == "a"


def test_a_pickle_inside_the_storage_bytes_is_not_run():
    # torch.storage._load_from_bytes runs torch.load(weights_only=False) on its bytes; ours runs
    # torch.load(weights_only=True), whose own unpickler refuses the nested global.
    inner = io.BytesIO()
    pickle.dump(Runs(os.system, "true"), inner)

    class Smuggles:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (inner.getvalue(),))

    with pytest.raises(ControlInvalid, match="cannot be read"):
        decode_pickle(pickle.dumps([("w", Smuggles())]), budget=BIG)


def test_memo_references_cannot_multiply_the_bytes_materialised():
    t = torch.zeros(1000)
    payload = pickle.dumps([(f"w{i}", t.clone()) for i in range(4)])
    decode_pickle(payload, budget=5 * 4000 + 4096)
    with pytest.raises(ControlInvalid, match="more than 8000 bytes"):
        decode_pickle(payload, budget=8000)


def test_rebuild_arguments_are_checked():
    class OutOfBounds:
        def __reduce__(self):
            storage = torch.zeros(2).storage()  # typed, as pickle.dumps(tensor) writes it
            # 100 elements from a 2-element storage: torch itself would not object.
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (100,), (1,), False, {}))

    with pytest.raises(ControlInvalid, match="reaches element 99 of a 2-element storage"):
        decode_pickle(pickle.dumps([("w", OutOfBounds())]), budget=BIG)


def test_the_payload_must_be_named_tensors():
    with pytest.raises(ControlInvalid, match="list of \\(name, tensor\\) pairs"):
        decode_pickle(pickle.dumps(42), budget=BIG)
    with pytest.raises(ControlInvalid, match="is a int, not a tensor"):
        decode_pickle(pickle.dumps([("w", 3)]), budget=BIG)
    with pytest.raises(ControlInvalid, match="cannot be read"):
        decode_pickle(b"not a pickle", budget=BIG)


def header_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**12), "over the limit"),
        (struct.pack("<Q", 50) + b"{}", "runs past"),
        (struct.pack("<Q", 3) + b"{x}", "not JSON"),
        (header_bytes({"w": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "Q8"),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "8 bytes",
        ),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b""),
            "not inside",
        ),
        (
            header_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape",
        ),
    ],
)
def test_safetensors_headers_are_checked_before_reading(payload, message):
    with pytest.raises(ControlInvalid, match=message):
        safetensors_header(payload)


def test_safetensors_decode_reads_views_of_the_payload():
    data = save({"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.bfloat16)})
    out = {i.name: i for i in decode_safetensors(data)}
    assert torch.equal(out["a"].value, torch.arange(4.0))
    assert out["b"].dtype == torch.bfloat16 and out["b"].shape == (2, 2)


def test_plan_lists_every_problem_and_passes_nothing(tensors, model):
    sd = model.state_dict()
    good = sd["model.norm.weight"]
    incoming = decode_safetensors(
        save(
            {
                "model.norm.weight": good.clone(),
                "model.layers.0.mlp.up_proj.weight": torch.ones(3, 3),
                "nope": torch.ones(1),
                "model.layers.1.input_layernorm.weight": good.double(),
            }
        )
    )
    with pytest.raises(ControlInvalid) as e:
        plan(tensors, incoming)
    msg = str(e.value)
    assert "nothing was changed" in msg
    assert "'model.layers.0.mlp.up_proj.weight': shape [3, 3], the model's is [128, 64]" in msg
    assert "'nope': the model has no tensor of that name" in msg
    assert "'model.layers.1.input_layernorm.weight': dtype float64, the model's is float32" in msg
    ok = plan(tensors, decode_safetensors(save({"model.norm.weight": good.clone()})))
    assert len(ok) == 1


def test_a_checkpoint_must_cover_the_model_and_may_be_cast(tensors, model):
    sd = {k: v.clone().bfloat16() for k, v in model.state_dict().items()}
    del sd["model.norm.weight"]
    incoming = decode_safetensors(save(sd))
    with pytest.raises(ControlInvalid, match=r"'model\.norm\.weight': missing from the checkpoint"):
        plan(tensors, incoming, complete=True, cast=True)
    with pytest.raises(ControlInvalid, match="no cast is made"):
        plan(tensors, incoming)


def test_tied_names_update_one_tensor_and_must_agree():
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    mt = ModelTensors(tied)
    assert mt.names_of(tied.lm_head.weight) == ["model.embed_tokens.weight", "lm_head.weight"]
    w = torch.randn(32, 16)
    pairs = plan(mt, decode_safetensors(save({"lm_head.weight": w})))
    assert pairs[0][0] is tied.model.embed_tokens.weight
    same = decode_safetensors(save({"lm_head.weight": w, "model.embed_tokens.weight": w.clone()}))
    assert len(check_tied(plan(mt, same), mt)) == 1
    differ = decode_safetensors(save({"lm_head.weight": w, "model.embed_tokens.weight": w + 1}))
    with pytest.raises(ControlInvalid, match="one tied tensor"):
        check_tied(plan(mt, differ), mt)


def test_payload_limit_is_the_models_size_plus_framing(tensors):
    assert tensors.total_bytes == sum(t.numel() * 4 for t in tensors.distinct.values())
    assert tensors.total_bytes < tensors.payload_limit() < tensors.total_bytes + (32 << 20)


def ipc_args(size=(2, 3), dtype=torch.float32):
    """What reduce_tensor returns for a CUDA tensor (its argument layout), with fake handles."""
    return (
        torch.Tensor,
        torch.Size(size),
        (size[1], 1),
        0,
        torch.storage.TypedStorage,
        dtype,
        0,
        b"\x01" * 64,
        24,
        0,
        False,
        b"/torch_123_456",
        0,
        b"\x02" * 64,
        True,
    )


def test_a_cuda_ipc_bucket_is_checked_without_opening_a_handle():
    # verl's shape: pickle.dumps([(name, reduce_tensor(param.detach())), ...]).
    payload = pickle.dumps([("w", (rebuild_cuda_tensor, ipc_args()))])
    (inc,) = decode_cuda_ipc(payload)
    assert (inc.name, inc.shape, inc.dtype) == ("w", (2, 3), torch.float32)
    assert isinstance(inc.value, IpcHandle)  # nothing opened yet


def test_a_cuda_ipc_bucket_admits_only_rebuild_cuda_tensor():
    from torch.multiprocessing.reductions import rebuild_storage_fd

    payload = pickle.dumps([("w", (rebuild_storage_fd, (1, 2, 3)))])
    with pytest.raises(ControlInvalid, match="rebuild_storage_fd, which is not admitted"):
        decode_cuda_ipc(payload)
    hostile = pickle.dumps(
        [("w", (rebuild_cuda_tensor, ipc_args())), ("x", Runs(os.system, "true"))]
    )
    with pytest.raises(ControlInvalid, match=r"posix\.system"):
        decode_cuda_ipc(hostile)
    bad = list(ipc_args())
    bad[7] = "not bytes"
    with pytest.raises(ControlInvalid, match="storage handle is malformed"):
        decode_cuda_ipc(pickle.dumps([("w", (rebuild_cuda_tensor, tuple(bad)))]))
    with pytest.raises(ControlInvalid, match="takes 15 arguments"):
        decode_cuda_ipc(pickle.dumps([("w", (rebuild_cuda_tensor, ipc_args()[:6]))]))


def test_an_ordered_dict_is_all_collections_admits():
    payload = pickle.dumps([("w", collections.deque([1]))])
    with pytest.raises(ControlInvalid, match=r"collections\.deque"):
        decode_pickle(payload, budget=BIG)
