"""Weight payloads for UpdateWeights: decoded to named tensors and checked against the model's
own tensors (every name, shape and dtype) before anything is written, so that an update that
fails changes nothing.

Here: the check against the model (tied weights included), safetensors payloads (SGLang's
/update_weights_from_tensor with load_format "safetensors") and Hugging Face checkpoint
directories of *.safetensors files (SGLang's /update_weights_from_disk). Pickles, of CPU tensors
or of CUDA IPC handles, are read by the restricted unpickler in weights_pickle.py.

Only torch is imported at module level: the synthetic engine reads safetensors headers through
`safetensors_header`, which needs nothing else.
"""

from __future__ import annotations

import collections
import json
import math
import struct
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
        if not isinstance(shape, list) or not all(is_count(d) for d in shape):
            raise ControlInvalid(
                f"safetensors tensor {name!r}: shape {shape!r} is not a list of sizes"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(is_count(o) for o in offsets)
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


def is_count(v: object) -> bool:
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
