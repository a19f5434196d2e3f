"""Weight payloads for UpdateWeights: decoded to named tensors and checked against the model's
own tensors (every name, shape and dtype) before anything is written, so that an update that
fails changes nothing.

Payloads:
- safetensors bytes (SGLang's /update_weights_from_tensor with load_format "safetensors");
- pickles of named CPU tensors (SGLang's default serializer), read by a restricted unpickler
  that admits only the tensor-rebuild functions, each through a wrapper that checks its
  arguments; `torch.storage._load_from_bytes` (which calls `torch.load(weights_only=False)`)
  is replaced by `torch.load(weights_only=True)`. Any other global is refused by name;
- CUDA IPC: the pickled list of (name, (rebuild_cuda_tensor, args)) that trtllm-serve's
  /update_weights takes, as verl's TRTLLMAsyncRollout.update_weights builds it
  (`pickle.dumps([(name, reduce_tensor(param.detach())), ...])`, verl/workers/rollout/
  trtllm_rollout/trtllm_rollout.py) and TensorRT-LLM's WorkerExtension.update_weights reads it
  (`func, args = tensor_handle; args[6] = self.device_id; func(*args)`,
  tensorrt_llm/llmapi/rlhf_utils.py). Only `torch.multiprocessing.reductions.
  rebuild_cuda_tensor` is admitted as the function, and no handle is opened until every
  name, shape and dtype (read from the arguments) has been checked.
- a Hugging Face checkpoint directory of *.safetensors files (SGLang's
  /update_weights_from_disk).

Only torch is imported at module level: the synthetic engine reads safetensors headers through
`safetensors_header`, which needs nothing else.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorgate.executor.control import ControlInvalid

# safetensors' own ceiling on the JSON header (safetensors/src/tensor.rs MAX_HEADER_SIZE).
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000
# What a payload may carry beyond the tensors' own bytes: headers, pickle framing, names.
PAYLOAD_OVERHEAD_BYTES = 16 * 1024 * 1024
PER_TENSOR_OVERHEAD_BYTES = 4096
MAX_LISTED = 8  # problems listed in one error message

_SAFETENSORS_DTYPES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def safetensors_header(data: bytes | memoryview) -> dict[str, HeaderEntry]:
    """The tensors a safetensors buffer declares, checked as safetensors itself checks them
    (header size, JSON, known dtypes, offsets inside the buffer and matching each shape); no
    tensor is materialised. ControlInvalid names what is wrong."""
    view = memoryview(data)
    if len(view) < 8:
        raise ControlInvalid(f"safetensors payload of {len(view)} bytes: too short for a header")
    (n,) = struct.unpack("<Q", view[:8])
    if n > MAX_SAFETENSORS_HEADER_BYTES:
        raise ControlInvalid(
            f"safetensors header of {n} bytes: over the limit of {MAX_SAFETENSORS_HEADER_BYTES}"
        )
    if 8 + n > len(view):
        raise ControlInvalid(
            f"safetensors header of {n} bytes runs past the {len(view)}-byte payload"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlInvalid(f"safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ControlInvalid("safetensors header is not a JSON object")
    body = len(view) - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise ControlInvalid(f"safetensors entry {name!r} is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ControlInvalid(f"safetensors tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ControlInvalid(
                f"safetensors tensor {name!r}: shape {shape!r} is not a list of sizes"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or not offsets[0] <= offsets[1] <= body
        ):
            raise ControlInvalid(
                f"safetensors tensor {name!r}: data_offsets {offsets!r} not inside the "
                f"{body}-byte data section"
            )
        want = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != want:
            raise ControlInvalid(
                f"safetensors tensor {name!r}: {offsets[1] - offsets[0]} bytes of data for shape "
                f"{shape} of {dtype} ({want} bytes)"
            )
        entries[name] = HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])
    return entries


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# -- the model's side ----------------------------------------------------------------------------


class ModelTensors:
    """The model's writable tensors by name (state_dict names, parameters and persistent
    buffers). Tied weights (lm_head sharing embed_tokens) are one tensor under two names:
    either name updates it."""

    def __init__(self, model) -> None:
        self.by_name: dict[str, Any] = dict(model.state_dict(keep_vars=True))
        self._names_of: dict[int, list[str]] = collections.defaultdict(list)
        for name, t in self.by_name.items():
            self._names_of[id(t)].append(name)
        self.distinct = {id(t): t for t in self.by_name.values()}

    def names_of(self, tensor) -> list[str]:
        return self._names_of[id(tensor)]

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.distinct.values())

    def payload_limit(self, payloads: int = 1) -> int:
        """Most bytes an update's payloads may carry: every tensor once, plus framing."""
        return (
            self.total_bytes
            + PAYLOAD_OVERHEAD_BYTES * max(payloads, 1)
            + PER_TENSOR_OVERHEAD_BYTES * len(self.by_name)
        )


@dataclass
class Incoming:
    """One named tensor of an update: its declared shape and dtype, and its value (a tensor,
    or what opens it: a CUDA IPC handle), read only after the check."""

    name: str
    shape: tuple[int, ...]
    dtype: Any  # torch.dtype
    value: Any


def plan(
    model: ModelTensors,
    incoming: Iterable[Incoming],
    *,
    complete: bool = False,
    cast: bool = False,
) -> list[tuple[Any, Incoming]]:
    """(target tensor, incoming) for every incoming tensor, once everything was checked:
    known names, each name once, shapes, dtypes (cast: any floating dtype is accepted, to be
    converted to the model's), and with `complete`, every tensor of the model covered.
    ControlInvalid lists the problems (the first MAX_LISTED) and changes nothing."""
    problems: list[str] = []
    seen: dict[str, Incoming] = {}
    pairs: list[tuple[Any, Incoming]] = []
    for inc in incoming:
        if inc.name in seen:
            problems.append(f"{inc.name!r} appears twice")
            continue
        seen[inc.name] = inc
        target = model.by_name.get(inc.name)
        if target is None:
            problems.append(f"{inc.name!r}: the model has no tensor of that name")
            continue
        want_shape = tuple(target.shape)
        if tuple(inc.shape) != want_shape:
            problems.append(
                f"{inc.name!r}: shape {list(inc.shape)}, the model's is {list(want_shape)}"
            )
            continue
        same = inc.dtype == target.dtype
        castable = cast and inc.dtype.is_floating_point and target.dtype.is_floating_point
        if not (same or castable):
            problems.append(
                f"{inc.name!r}: dtype {_dtype_name(inc.dtype)}, the model's is "
                f"{_dtype_name(target.dtype)}"
                + ("" if cast else " (send the model's dtype: no cast is made)")
            )
            continue
        pairs.append((target, inc))
    if complete and not problems:
        covered = {id(t) for t, _ in pairs}
        missing = [model.names_of(t)[0] for key, t in model.distinct.items() if key not in covered]
        problems += [f"{name!r}: missing from the checkpoint" for name in missing]
    if not pairs and not problems:
        problems.append("no tensors in the update")
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        raise ControlInvalid(
            f"weight update refused, nothing was changed: {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )
    return pairs


def check_tied(pairs: list[tuple[Any, Incoming]], model: ModelTensors) -> list[tuple[Any, Any]]:
    """(target, value) with one value per target tensor: where an update names both of a tied
    pair, the two values must be equal (the model cannot hold two). Values are tensors here."""
    import torch

    by_target: dict[int, tuple[Any, Incoming]] = {}
    for target, inc in pairs:
        prior = by_target.get(id(target))
        if prior is None:
            by_target[id(target)] = (target, inc)
        elif not torch.equal(prior[1].value.to(inc.value.device), inc.value):
            raise ControlInvalid(
                f"weight update refused, nothing was changed: {prior[1].name!r} and "
                f"{inc.name!r} are one tied tensor in the model "
                f"({' = '.join(model.names_of(target))}) but differ in the update"
            )
    return [(target, inc.value) for target, inc in by_target.values()]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- safetensors ---------------------------------------------------------------------------------


def decode_safetensors(data: bytes) -> list[Incoming]:
    """Named tensors of a safetensors payload, as read-only views of `data` (no copy: they are
    copied once, into the model). `data` must outlive them."""
    import warnings

    import torch

    header = safetensors_header(data)
    view = memoryview(data)
    base = 8 + struct.unpack("<Q", view[:8])[0]
    out = []
    with warnings.catch_warnings():
        # "The given buffer is not writable": the views are only ever read.
        warnings.simplefilter("ignore", UserWarning)
        for name, e in header.items():
            dtype = _torch_dtype(e.dtype)
            n = math.prod(e.shape)
            if n == 0:
                t = torch.empty(e.shape, dtype=dtype)
            else:
                t = torch.frombuffer(view, dtype=dtype, count=n, offset=base + e.begin)
                t = t.reshape(e.shape)
            out.append(Incoming(name, e.shape, dtype, t))
    return out


# -- restricted pickle ---------------------------------------------------------------------------


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
        if not (_is_count(storage_offset) and _ints(size) and _ints(stride)):
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
        ("offset", _is_count(a[3])),
        ("storage class", a[4] in (torch.storage.TypedStorage, torch.UntypedStorage)),
        ("dtype", isinstance(a[5], torch.dtype)),
        ("device", isinstance(a[6], int)),
        ("storage handle", isinstance(a[7], bytes)),
        ("storage size", _is_count(a[8])),
        ("storage offset", _is_count(a[9])),
        ("requires_grad", isinstance(a[10], bool)),
        ("ref counter handle", isinstance(a[11], bytes)),
        ("ref counter offset", _is_count(a[12])),
        ("event handle", a[13] is None or isinstance(a[13], bytes)),
        ("event_sync_required", isinstance(a[14], bool)),
    )
    for what, ok in kinds:
        if not ok:
            raise ControlInvalid(
                f"CUDA IPC bucket: {name!r}: rebuild_cuda_tensor's {what} is malformed"
            )


# -- a checkpoint on disk ------------------------------------------------------------------------


def checkpoint_files(path: str) -> list[Path]:
    """The *.safetensors files of a Hugging Face checkpoint directory."""
    d = Path(path)
    if not path:
        raise ControlInvalid("model_path is empty")
    if not d.is_dir():
        raise ControlInvalid(f"model_path {path!r} is not a directory")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.glob("*.bin"))
        extra = f" ({', '.join(pickles)} are pickles, which are not loaded)" if pickles else ""
        raise ControlInvalid(f"model_path {path!r} has no *.safetensors files{extra}")
    return files


class LazyTensor:
    """A tensor of a checkpoint file, read when it is written."""

    def __init__(self, file: Path, name: str) -> None:
        self.file, self.name = file, name


def read_checkpoint_headers(files: list[Path]) -> list[Incoming]:
    """Every tensor the files declare (name, shape, dtype), values left on disk."""
    from safetensors import safe_open

    out = []
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dtype = _torch_dtype(sl.get_dtype())
                    out.append(Incoming(name, tuple(sl.get_shape()), dtype, LazyTensor(f, name)))
        except ControlInvalid:
            raise
        except Exception as e:
            raise ControlInvalid(f"{f.name} cannot be read as safetensors: {e}") from None
    return out


def _torch_dtype(name: str):
    import torch

    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
    }
    if name not in table:
        raise ControlInvalid(f"safetensors dtype {name} is not supported")
    return table[name]


def load_lazy(pairs: list[tuple[Any, Incoming]]) -> list[tuple[Any, Incoming]]:
    """Reads the checkpoint values of `pairs` (one file open at a time)."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[Any, Incoming]]] = collections.defaultdict(list)
    for target, inc in pairs:
        by_file[inc.value.file].append((target, inc))
    out = []
    for f, items in by_file.items():
        with safe_open(str(f), "pt") as st:
            for target, inc in items:
                inc.value = st.get_tensor(inc.value.name)
                out.append((target, inc))
    return out
