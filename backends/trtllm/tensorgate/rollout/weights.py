"""Turning a trainer's state dict into the payloads of the weight-update routes.

Two encodings, one per transport:
- safetensors bytes, base64, for SGLang's `/update_weights_from_tensor` (the tensors travel in
  the body: any host, any device; the CPU path);
- CUDA IPC handles for trtllm-serve's `/update_weights`: `reduce_tensor(param)` per tensor, the
  list of `(name, handle)` pickled and base64-encoded, keyed by the GPU's UUID, exactly as verl's
  TRT-LLM rollout sends it (volcengine/verl `verl/workers/rollout/trtllm_rollout/trtllm_rollout.py`,
  `TRTLLMAsyncRollout.update_weights`: `reduce_tensor(param.detach())`, then
  `{device_uuid: base64.b64encode(pickle.dumps(cur_handles)).decode("utf-8")}`) and as
  TensorRT-LLM's `tensorrt_llm/llmapi/rlhf_utils.py` `WorkerExtension.update_weights` reads it
  (`ipc_handles[device_uuid]`, base64-decoded, unpickled to a list of `(name, (func, args))`).
  The UUID is spelled as TensorRT-LLM's `tensorrt_llm/_torch/utils.py` `get_device_uuid` does:
  `"GPU-" + str(torch.cuda.get_device_properties(i).uuid)`.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

NamedTensors = list[tuple[str, torch.Tensor]]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def unique_named_tensors(state_dict: Mapping[str, torch.Tensor]) -> NamedTensors:
    """The state dict's tensors, each storage view once (the first name wins).

    Tied weights (SmolLM2's `lm_head.weight` is `model.embed_tokens.weight`) appear under two
    names sharing one storage: safetensors refuses shared tensors, and writing the same values
    twice would only cost time; `named_parameters()` lists them once in the same way.
    """
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]] = set()
    out: NamedTensors = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        key = (
            t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Consecutive groups of at most `bucket_bytes` each; a tensor larger than that is a bucket
    of its own (it is never split: the routes take whole tensors)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    current: NamedTensors = []
    size = 0
    for name, t in named:
        n = tensor_bytes(t)
        if current and size + n > bucket_bytes:
            yield current
            current, size = [], 0
        current.append((name, t))
        size += n
    if current:
        yield current


def safetensors_payload(bucket: NamedTensors, dtype: torch.dtype | None = None) -> bytes:
    """One `serialized_named_tensors` item: the bucket as a safetensors file, base64 (ASCII
    bytes, kept as bytes: see json_with_base64_list)."""
    from safetensors.torch import save

    tensors = {}
    for name, t in bucket:
        t = t.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        tensors[name] = t.to("cpu").contiguous()
    return base64.b64encode(save(tensors))


def json_with_base64_list(key: str, items: list[bytes], fields: dict[str, Any]) -> bytes:
    """The JSON object `{key: [items as strings], **fields}`, assembled as bytes.

    json.dumps scans a string character by character for escapes: ~9 s for one 128 MiB
    bucket's base64 on this project's 2-core CPU, more than serializing the tensors. Base64's
    alphabet needs no escaping, so the items are spliced in as they are."""
    head = b'{"' + key.encode() + b'":["' + b'","'.join(items) + b'"]'
    if not fields:
        return head + b"}"
    return head + b"," + json.dumps(fields).encode()[1:]


def gpu_uuid(device: torch.device) -> str:
    """The UUID of a CUDA device, spelled as TensorRT-LLM's get_device_uuid spells it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "GPU-" + str(torch.cuda.get_device_properties(index).uuid)


def cuda_ipc_payload(
    bucket: NamedTensors, dtype: torch.dtype | None = None
) -> tuple[dict[str, str], list[torch.Tensor]]:
    """The `weights` object of one `/update_weights` call: GPU UUID -> base64 of the pickled
    list of (name, CUDA IPC handle) of that GPU's tensors.

    Also returns the tensors the handles point to: the caller must keep them alive until the
    server has answered (it copies from them during the call); a cast makes new tensors.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    by_gpu: dict[str, list[tuple[str, object]]] = {}
    keep: list[torch.Tensor] = []
    for name, t in bucket:
        if t.device.type != "cuda":
            raise ValueError(
                f"tensor {name!r} is on {t.device}: CUDA IPC needs every tensor on a GPU "
                "(use transport='tensors' for CPU tensors)"
            )
        t = t.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        keep.append(t)
        by_gpu.setdefault(gpu_uuid(t.device), []).append((name, reduce_tensor(t)))
    weights = {
        uuid: base64.b64encode(pickle.dumps(handles)).decode("utf-8")
        for uuid, handles in by_gpu.items()
    }
    return weights, keep
