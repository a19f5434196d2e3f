"""The restricted unpickler for weight payloads: pickles of named CPU tensors (SGLang's default
serializer, and plain `pickle.dumps` of tensors) and trtllm-serve's CUDA IPC buckets.

Only the tensor-rebuild functions are admitted, each through a wrapper that checks its
arguments; `torch.storage._load_from_bytes` (which calls `torch.load(weights_only=False)`) is
replaced by `torch.load(weights_only=True)`. Any other global is refused by name.

CUDA IPC: the pickled list of (name, (rebuild_cuda_tensor, args)) that trtllm-serve's
/update_weights takes, as verl's TRTLLMAsyncRollout.update_weights builds it
(`pickle.dumps([(name, reduce_tensor(param.detach())), ...])`, verl/workers/rollout/
trtllm_rollout/trtllm_rollout.py) and TensorRT-LLM's WorkerExtension.update_weights reads it
(`func, args = tensor_handle; args[6] = self.device_id; func(*args)`,
tensorrt_llm/llmapi/rlhf_utils.py). Only `torch.multiprocessing.reductions.rebuild_cuda_tensor`
is admitted as the function, and no handle is opened until every name, shape and dtype (read from
the arguments) has been checked.
"""

from __future__ import annotations

import collections
import io
import pickle
import threading
from dataclasses import dataclass
from typing import Any

from tensorgate.executor.control import ControlInvalid
from tensorgate.executor.weights import Incoming, is_count


def _admitted_cpu() -> dict[tuple[str, str], Any]:
    """The globals a pickle of CPU tensors needs (what `pickle.dumps(tensor)` and of an
    nn.Parameter writes), each mapped to a checked stand-in."""
    import torch

    def load_from_bytes(b):
        if not isinstance(b, bytes | bytearray):
            raise ControlInvalid("torch.storage._load_from_bytes takes bytes")
        _Budget.current().take(len(b))
        # The original calls torch.load(weights_only=False): a pickle inside the pickle.
        return torch.load(io.BytesIO(b), weights_only=True)

    def rebuild_tensor_v2(
        storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
    ):
        if not isinstance(storage, torch.storage.TypedStorage):
            raise ControlInvalid("_rebuild_tensor_v2: its first argument is not a typed storage")
        if not (is_count(storage_offset) and _ints(size) and _ints(stride)):
            raise ControlInvalid("_rebuild_tensor_v2: offset, size and stride must be integers")
        if backward_hooks or metadata:
            raise ControlInvalid("_rebuild_tensor_v2: backward hooks and metadata are refused")
        _check_bounds(storage.size(), storage_offset, size, stride)
        try:
            return torch._utils._rebuild_tensor_v2(
                storage,
                storage_offset,
                tuple(size),
                tuple(stride),
                False,
                collections.OrderedDict(),
            )
        except RuntimeError as e:  # size/stride out of the storage's bounds
            raise ControlInvalid(f"_rebuild_tensor_v2: {e}") from None

    def rebuild_parameter(data, requires_grad, backward_hooks):
        if not isinstance(data, torch.Tensor):
            raise ControlInvalid("_rebuild_parameter: its first argument is not a tensor")
        if backward_hooks:
            raise ControlInvalid("_rebuild_parameter: backward hooks are refused")
        return data  # the value is what counts; it is copied into the model's own parameter

    return {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): load_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


class _IpcRebuild:
    """Stands for torch.multiprocessing.reductions.rebuild_cuda_tensor in an unpickled CUDA
    IPC list: nothing is opened while unpickling."""


def _admitted_ipc() -> dict[tuple[str, str], Any]:
    import torch

    admitted: dict[tuple[str, str], Any] = {
        ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"): _IpcRebuild,
        ("torch", "Tensor"): torch.Tensor,
        ("torch._tensor", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch", "Size"): torch.Size,
        ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            admitted[("torch", name)] = getattr(torch, name)
    return admitted


def _check_bounds(storage_elems: int, offset: int, size, stride) -> None:
    """A view must stay inside its storage: torch does not check it when rebuilding, and a
    tensor past its storage's end reads (and writes) memory that is not its own."""
    if len(size) != len(stride) or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise ControlInvalid("_rebuild_tensor_v2: size and stride must be non-negative and match")
    if 0 in size:
        return
    last = offset + sum((d - 1) * s for d, s in zip(size, stride, strict=True))
    if last >= storage_elems:
        raise ControlInvalid(
            f"_rebuild_tensor_v2: a view of shape {list(size)} reaches element {last} of a "
            f"{storage_elems}-element storage"
        )


def _ints(v: object) -> bool:
    return isinstance(v, tuple | list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in v
    )


class _Budget:
    """Bytes a pickle may materialise (memo references can repeat one bytes object many
    times); one per decode, kept per thread."""

    _local = threading.local()

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @classmethod
    def current(cls) -> _Budget:
        return cls._local.budget

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise ControlInvalid(
                f"the pickle materialises more than {self.limit} bytes of tensors (the model's "
                "size plus framing): refused"
            )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, admitted: dict[tuple[str, str], Any]) -> None:
        super().__init__(io.BytesIO(data))
        self._admitted = admitted

    def find_class(self, module: str, name: str) -> Any:
        found = self._admitted.get((module, name))
        if found is None:
            allowed = ", ".join(sorted({f"{m}.{n}" for m, n in self._admitted if m != "torch"}))
            raise ControlInvalid(
                f"the pickle refers to {module}.{name}, which is not admitted: only tensor-rebuild "
                f"functions are ({allowed})"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise ControlInvalid("the pickle uses persistent ids: refused")


def _unpickle(data: bytes, admitted: dict[tuple[str, str], Any], budget: int) -> Any:
    _Budget._local.budget = _Budget(budget)
    try:
        return _RestrictedUnpickler(data, admitted).load()
    except ControlInvalid:
        raise
    except RecursionError:
        raise ControlInvalid("the pickle nests too deeply: refused") from None
    except Exception as e:
        raise ControlInvalid(f"the pickle cannot be read: {type(e).__name__}: {e}") from None
    finally:
        _Budget._local.budget = None


def _pairs(obj: Any, what: str) -> list[tuple[str, Any]]:
    """(name, value) pairs from a list/tuple of pairs or a dict, as trainers send them."""
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list | tuple):
        items = list(obj)
    else:
        raise ControlInvalid(
            f"{what}: expected a list of (name, tensor) pairs or a dict, got {type(obj).__name__}"
        )
    pairs = []
    for item in items:
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
            raise ControlInvalid(f"{what}: every item must be a (name, tensor) pair")
        pairs.append((item[0], item[1]))
    return pairs


def decode_pickle(data: bytes, budget: int) -> list[Incoming]:
    """Named CPU tensors from a pickle (list of (name, tensor) pairs, or a dict)."""
    import torch

    obj = _unpickle(data, _admitted_cpu(), budget)
    out = []
    for name, value in _pairs(obj, "pickle payload"):
        if not isinstance(value, torch.Tensor):
            raise ControlInvalid(
                f"pickle payload: {name!r} is a {type(value).__name__}, not a tensor"
            )
        if value.device.type != "cpu":
            raise ControlInvalid(f"pickle payload: {name!r} is not a CPU tensor")
        out.append(Incoming(name, tuple(value.shape), value.dtype, value))
    return out


# -- CUDA IPC ------------------------------------------------------------------------------------

# rebuild_cuda_tensor's arguments, as torch.multiprocessing.reductions.reduce_tensor returns them
# for a CUDA tensor: (tensor_cls, tensor_size, tensor_stride, tensor_offset, storage_cls,
# dtype, storage_device, storage_handle, storage_size_bytes, storage_offset_bytes,
# requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required).
_IPC_ARGS = 15
_IPC_DEVICE = 6  # replaced by the engine's own device index, as TensorRT-LLM does


@dataclass(frozen=True)
class IpcHandle:
    args: tuple

    def open(self, device_index: int):
        """The producer's tensor, mapped into this process on `device_index` (no copy)."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(self.args)
        args[_IPC_DEVICE] = device_index
        try:
            return rebuild_cuda_tensor(*args)
        except Exception as e:
            raise ControlInvalid(f"a CUDA IPC handle cannot be opened: {e}") from None


def decode_cuda_ipc(data: bytes) -> list[Incoming]:
    """Named, checked CUDA IPC handles from trtllm-serve's pickled list; nothing opened."""
    import torch

    obj = _unpickle(data, _admitted_ipc(), budget=len(data))
    out = []
    for name, handle in _pairs(obj, "CUDA IPC bucket"):
        if not (isinstance(handle, tuple | list) and len(handle) == 2):
            raise ControlInvalid(f"CUDA IPC bucket: {name!r}: the handle must be (function, args)")
        func, args = handle
        if func is not _IpcRebuild:
            raise ControlInvalid(
                f"CUDA IPC bucket: {name!r}: the function must be "
                "torch.multiprocessing.reductions.rebuild_cuda_tensor"
            )
        if not isinstance(args, tuple | list) or len(args) != _IPC_ARGS:
            raise ControlInvalid(
                f"CUDA IPC bucket: {name!r}: rebuild_cuda_tensor takes {_IPC_ARGS} arguments"
            )
        _check_ipc_args(name, args, torch)
        out.append(Incoming(name, tuple(args[1]), args[5], IpcHandle(tuple(args))))
    return out


def _check_ipc_args(name: str, a, torch) -> None:
    kinds = (
        ("tensor class", a[0] in (torch.Tensor, torch.nn.Parameter)),
        ("size", _ints(a[1])),
        ("stride", _ints(a[2])),
        ("offset", is_count(a[3])),
        ("storage class", a[4] in (torch.storage.TypedStorage, torch.UntypedStorage)),
        ("dtype", isinstance(a[5], torch.dtype)),
        ("device", isinstance(a[6], int)),
        ("storage handle", isinstance(a[7], bytes)),
        ("storage size", is_count(a[8])),
        ("storage offset", is_count(a[9])),
        ("requires_grad", isinstance(a[10], bool)),
        ("ref counter handle", isinstance(a[11], bytes)),
        ("ref counter offset", is_count(a[12])),
        ("event handle", a[13] is None or isinstance(a[13], bytes)),
        ("event_sync_required", isinstance(a[14], bool)),
    )
    for what, ok in kinds:
        if not ok:
            raise ControlInvalid(
                f"CUDA IPC bucket: {name!r}: rebuild_cuda_tensor's {what} is malformed"
            )
