"""Rollout control for the transformers engine: memory release/resume, weight updates, prefix
cache flush and in-place pause, on transformers' continuous-batching manager.

- Pauses use the manager's own `pause()` (transformers >= 5.18): the loop parks between steps
  (in `prepare_next_batch`, before the next forward), keeping its requests and their cache.
  An in-place pause is that context held open by a thread of its own until continue; every
  weight write happens inside one too, so no forward ever sees half-written weights.
- "kv_cache": the manager is stopped, which drops its batch processor and with it the paged
  cache (`ContinuousBatchingManager.stop`: batch_processor = None, gc, empty_cache); resume
  starts it again with a fresh cache.
- "model": on CUDA the weights go to pinned CPU memory and the device copies are dropped; on
  CPU they are written to a private safetensors file and dropped from memory, which is what
  really lowers the resident set (a copy kept in RAM would free nothing). Resume reads back
  exactly the weights of the moment of release, updated ones included.
- A release ends every live request with an error that says why (the router normally aborts
  or holds them first) and waits until the manager holds none, so no forward can run on
  released weights; new requests are refused until resume.
- Updates: every name, shape and dtype is checked (executor/weights.py) before anything is
  written; tied weights (lm_head = embed_tokens) may be sent under either name.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from tensorgate.executor.control import (
    KV_CACHE,
    MODEL,
    ControlConflict,
    ControlFeatures,
    ControlInvalid,
    ControlResult,
    noop_note,
    resolve_tags,
    update_source,
)
from tensorgate.executor.weights import (
    ModelTensors,
    check_tied,
    checkpoint_files,
    decode_safetensors,
    load_lazy,
    plan,
    read_checkpoint_headers,
)
from tensorgate.executor.weights_pickle import decode_cuda_ipc, decode_pickle
from tensorgate.v1 import executor_pb2 as pb

log = logging.getLogger("tensorgate.executor.transformers")

MEMORY_TAGS = (KV_CACHE, MODEL)
DRAIN_TIMEOUT_S = 30.0
PAUSE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def resident_bytes() -> int:
    """This process's resident set (/proc/self/statm), in bytes."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Hands freed heap pages back to the OS (glibc keeps small freed blocks otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PauseHold:
    """Holds the manager's pause open from a thread of its own, from pause to continue."""

    def __init__(self, manager) -> None:
        self._manager = manager
        self._entered = threading.Event()
        self._leave = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cb-pause", daemon=True)

    def _run(self) -> None:
        try:
            with self._manager.pause():
                self._entered.set()
                self._leave.wait()
        except BaseException as e:  # the loop died or stopped before it could pause
            self._error = e
            self._entered.set()

    def enter(self) -> None:
        self._thread.start()
        if not self._entered.wait(PAUSE_TIMEOUT_S):
            self.leave()
            raise ControlConflict(f"the engine loop did not pause within {PAUSE_TIMEOUT_S:.0f} s")
        if self._error is not None:
            raise ControlConflict(f"the engine loop cannot pause: {self._error}")

    def leave(self) -> None:
        self._leave.set()
        self._thread.join(timeout=PAUSE_TIMEOUT_S)


class _Offloaded:
    """The model's weights while "model" is released: pinned CPU copies (CUDA), or (CPU) their
    raw bytes in a private file, tensor after tensor, read back into fresh memory on resume."""

    def __init__(self, tensors: ModelTensors, device: torch.device) -> None:
        self.device = device
        self.tensors = list(tensors.distinct.values())
        self.shapes = [(t.shape, t.dtype) for t in self.tensors]  # what resume allocates
        self.host: list[torch.Tensor] = []
        self.dir: Path | None = None

    def release(self) -> None:
        if self.device.type == "cuda":
            for t in self.tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t)
                self.host.append(host)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="tensorgate-released-"))  # 0700
            try:
                with open(self.file, "wb") as f:
                    for t in self.tensors:
                        f.write(_bytes_of(t.detach().contiguous()))
            except BaseException:
                self.discard()
                raise
        for t in self.tensors:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    @property
    def file(self) -> Path:
        assert self.dir is not None
        return self.dir / "weights.bin"

    def restore(self) -> None:
        if self.device.type == "cuda":
            for t, host in zip(self.tensors, self.host, strict=True):
                t.data = host.to(self.device, non_blocking=True)
            torch.cuda.synchronize(self.device)
        else:
            with open(self.file, "rb") as f:
                for t, (shape, dtype) in zip(self.tensors, self.shapes, strict=True):
                    fresh = torch.empty(shape, dtype=dtype)
                    view = _bytes_of(fresh)
                    if f.readinto(view) != len(view):
                        raise OSError(f"{self.file} is shorter than the weights written to it")
                    t.data = fresh
        self.discard()

    def discard(self) -> None:
        self.host.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes (no copy; any dtype)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class RolloutControl:
    """The control state of one TransformersEngine; its methods run on the server's control
    thread, one at a time. `refusal()` is read by the engine's submit."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.released: frozenset[str] = frozenset()  # replaced whole: other threads read it
        self._hold: _PauseHold | None = None
        self._offloaded: _Offloaded | None = None
        self._buckets = 0  # CUDA IPC buckets written since the last finalize

    @property
    def manager(self):
        return self.engine.manager

    # -- state read by the engine ---------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why a new request cannot run now, or None."""
        released = self.released
        if not released:
            return None
        return (
            f"the engine's memory is released ({', '.join(t for t in MEMORY_TAGS if t in released)}"
            "): resume it (/resume_memory) before generating"
        )

    def features(self) -> ControlFeatures:
        return ControlFeatures(
            memory_tags=MEMORY_TAGS,
            update_from_disk=True,
            update_from_tensors=True,
            update_from_cuda_ipc=self.engine.device.type == "cuda",
            flush_cache=True,
            pause_in_place=True,
        )

    def released_tags(self) -> list[str]:
        return [t for t in MEMORY_TAGS if t in self.released]

    # -- memory ---------------------------------------------------------------------------------

    def _measure(self) -> int:
        if self.engine.device.type == "cuda":
            return torch.cuda.memory_allocated(self.engine.device)
        return resident_bytes()

    def release(self, tags: list[str]) -> ControlResult:
        act, noop = resolve_tags(tags, MEMORY_TAGS)
        if self._hold is not None:
            raise ControlConflict(
                "generation is paused in place: continue it first (a release ends every live "
                "request, which an in-place pause is meant to keep)"
            )
        new = [t for t in act if t not in self.released]
        if not new:
            return ControlResult(message=f"already released: {', '.join(act)}{noop_note(noop)}")
        started = time.monotonic()
        if self.engine.device.type == "cpu":
            _trim_heap()  # what is measured is what this release frees, not older garbage
        before = self._measure()
        with self.engine.admission:
            self.released = self.released | set(new)
        try:
            self._end_live(
                f"the request was ended: the engine's memory was released ({', '.join(new)})"
            )
            self._drain()
            if MODEL in new:
                self._offload()
            if KV_CACHE in new:
                self._stop_manager()
                if self.engine.kv_ledger is not None:
                    self.engine.kv_ledger.cleared()  # the paged cache is gone with its blocks
        except BaseException:
            # Back to serving as before: weights already moved out come back first.
            if MODEL in new and self._offloaded is not None:
                with self._quiet():
                    self._offloaded.restore()
                self._offloaded = None
            with self.engine.admission:
                self.released = self.released - set(new)
            raise
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            _trim_heap()
        freed = before - self._measure()
        return ControlResult(
            message=f"released {', '.join(new)}: {_mib(freed)} freed "
            f"({self._measure_name()}) in {_ms(started)}{noop_note(noop)}",
            memory_delta_bytes=freed,
        )

    def resume(self, tags: list[str]) -> ControlResult:
        act, noop = resolve_tags(tags, MEMORY_TAGS)
        back = [t for t in act if t in self.released]
        if not back:
            return ControlResult(message=f"not released: {', '.join(act)}{noop_note(noop)}")
        started = time.monotonic()
        before = self._measure()
        # Weights first: a restarted loop must never find them missing.
        if MODEL in back:
            with self._quiet():
                assert self._offloaded is not None
                self._offloaded.restore()
                self._offloaded = None
        if KV_CACHE in back:
            self._start_manager()
        with self.engine.admission:
            self.released = self.released - set(back)
        taken = self._measure() - before
        return ControlResult(
            message=f"resumed {', '.join(back)}: {_mib(taken)} taken back "
            f"({self._measure_name()}) in {_ms(started)}{noop_note(noop)}",
            memory_delta_bytes=-taken,
        )

    def _measure_name(self) -> str:
        return "CUDA allocated bytes" if self.engine.device.type == "cuda" else "resident set"

    def _end_live(self, message: str) -> None:
        e = self.engine
        batch = pb.IterationOutput()
        with e._lock:
            failed = e.live.fail_all(message, batch)
        for rid, _ in failed:
            e.book.forget(str(rid))
            if self.manager.is_running():
                self.manager.cancel_request(str(rid))
        if batch.outputs and e._emit is not None:
            e._emit(batch)

    def _drain(self) -> None:
        """Waits until the manager holds no request (the cancellations reach it at its next
        step), so nothing runs on what is about to be released."""
        m = self.manager
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while m.is_running():
            bp = m.batch_processor
            busy = not m.input_queue.empty() or (bp is not None and bp.has_pending_requests())
            if not busy:
                return
            if time.monotonic() > deadline:
                raise ControlConflict(
                    f"the engine still ran requests {DRAIN_TIMEOUT_S:.0f} s after they were ended"
                )
            time.sleep(0.005)

    def _stop_manager(self) -> None:
        m = self.manager
        model = self.engine.model
        self._attn = model.config._attn_implementation
        m.stop(block=True, timeout=STOP_TIMEOUT_S, hard_stop=True)
        if m.is_running():
            raise ControlConflict("the engine loop did not stop; the KV cache is still held")

    def _start_manager(self) -> None:
        m = self.manager
        model = self.engine.model
        attn = getattr(self, "_attn", None)
        if attn is not None and model.config._attn_implementation != attn:
            # stop() put back the model's own attention; the loop ran on this one.
            m._original_attn_impl = model.config._attn_implementation
            model.set_attn_implementation(attn)
        self.engine._start_manager()
        self.engine.num_blocks = int(m.batch_processor.cache.num_blocks)

    def _offload(self) -> None:
        off = _Offloaded(ModelTensors(self.engine.model), self.engine.device)
        with self._quiet():
            off.release()
        self._offloaded = off

    @contextlib.contextmanager
    def _quiet(self):
        """No forward runs inside: the manager paused (or stopped)."""
        if self.manager.is_running():
            with self.manager.pause():
                yield
        else:
            yield

    # -- weights --------------------------------------------------------------------------------

    def update(self, req: pb.UpdateWeightsRequest) -> ControlResult:
        source = update_source(req)
        if MODEL in self.released:
            raise ControlConflict(
                "the weights are released: resume 'model' (/resume_memory) before updating them"
            )
        started = time.monotonic()
        if source == "finalize":
            # The version moves while the loop is parked: the next step's outputs carry it.
            with self._quiet():
                flushed = self.flush().message
                version = self.engine.versions.advance(req.weight_version)
            buckets, self._buckets = self._buckets, 0
            return ControlResult(
                message=f"finalized {buckets} bucket(s): weights now {version!r}; {flushed}"
            )
        tensors = ModelTensors(self.engine.model)
        if source == "cuda_ipc":
            written = self._from_cuda_ipc(req.cuda_ipc, tensors)
            self._buckets += 1
            return ControlResult(
                message=f"bucket of {written} tensor(s) written in {_ms(started)}; the weight "
                "version changes at finalize",
                tensors_updated=written,
            )
        if source == "tensors":
            pairs = self._from_tensors(req.tensors, tensors)
        else:
            pairs = self._from_disk(req.model_path, tensors)
        # Weights, cache and version change in one pause: no step sees a mix, and the first
        # step on the new weights already reports their version.
        note = ""
        with self._quiet():
            written = self._write(pairs)
            if req.flush_cache:
                note = "; " + self.flush().message
            version = self.engine.versions.advance(req.weight_version)
        return ControlResult(
            message=f"{written} tensor(s) written from {source} in {_ms(started)}: weights now "
            f"{version!r}{note}",
            tensors_updated=written,
        )

    def _from_tensors(self, st: pb.SerializedTensors, tensors: ModelTensors) -> list:
        """The checked (target, value) pairs of serialized tensors."""
        fmt = st.format or "safetensors"
        if fmt not in ("safetensors", "pickle"):
            raise ControlInvalid(f"tensors.format {fmt!r}: use safetensors or pickle")
        # Each read of a protobuf bytes field is a fresh copy: read them once.
        payloads = list(st.payloads)
        if not payloads:
            raise ControlInvalid("tensors carries no payloads")
        size = sum(len(p) for p in payloads)
        limit = tensors.payload_limit(len(payloads))
        if size > limit:
            raise ControlInvalid(
                f"the payloads hold {size} bytes, more than this model's weights and framing "
                f"({limit} bytes)"
            )
        incoming = []
        for p in payloads:
            if fmt == "safetensors":
                incoming += decode_safetensors(p)
            else:
                incoming += decode_pickle(p, budget=limit)
        return check_tied(plan(tensors, incoming), tensors)

    def _from_disk(self, path: str, tensors: ModelTensors) -> list:
        """The checked (target, value) pairs of a checkpoint directory, read from disk."""
        incoming = read_checkpoint_headers(checkpoint_files(path))
        # A checkpoint is the whole model; its dtype is cast as at load (bf16 files, fp32 CPU).
        pairs = plan(tensors, incoming, complete=True, cast=True)
        return check_tied(load_lazy(pairs), tensors)

    def _from_cuda_ipc(self, weights: pb.CudaIpcWeights, tensors: ModelTensors) -> int:
        device = self.engine.device
        if device.type != "cuda":
            raise ControlConflict(
                f"the engine runs on {device}: CUDA IPC handles need a CUDA device; send the "
                "tensors serialized instead (/update_weights_from_tensor)"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        # TensorRT-LLM's key: "GPU-" + str(torch.cuda.get_device_properties(i).uuid)
        # (get_device_uuid, tensorrt_llm/_torch/utils.py).
        uuid = "GPU-" + str(torch.cuda.get_device_properties(index).uuid)
        data = weights.handles_by_gpu.get(uuid)
        if data is None:
            raise ControlInvalid(
                f"no handles for this engine's GPU {uuid}; the update names "
                f"{', '.join(sorted(weights.handles_by_gpu)) or 'no GPU'}"
            )
        pairs = plan(tensors, decode_cuda_ipc(data))
        for _, inc in pairs:  # checked: now the producer's memory is mapped
            inc.value = inc.value.open(index)
        try:
            return self._write(check_tied(pairs, tensors))
        finally:
            for _, inc in pairs:
                inc.value = None
            torch.cuda.ipc_collect()

    def _write(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        with self._quiet(), torch.no_grad():
            for target, value in pairs:
                target.copy_(value)
            if self.engine.device.type == "cuda":
                torch.cuda.synchronize(self.engine.device)
        return len(pairs)

    # -- cache and pause ------------------------------------------------------------------------

    def flush(self) -> ControlResult:
        if not self.manager.is_running():
            return ControlResult(message="the KV cache is released: no prefix block is cached")
        with self.manager.pause():
            bp = self.manager.batch_processor
            cache = bp.cache if bp is not None else None
            if cache is None or not cache.use_prefix_sharing:
                return ControlResult(
                    message="prefix sharing is off in this cache: no prefix block is cached"
                )
            ledgers = [a.ledger for a in cache.cache_allocators.values() if hasattr(a, "ledger")]
            cached = sum(len(lg.cached_blocks) for lg in ledgers)
            cache.evict_cached_blocks()
            # Blocks live requests still hold keep their KV but are no longer offered to new
            # requests: they may have been computed with other weights.
            unshared = 0
            for lg in ledgers:
                unshared += len(lg.block_to_hash)
                lg.hash_to_block.clear()
                lg.block_to_hash.clear()
            if self.engine.kv_ledger is not None:
                self.engine.kv_ledger.cleared()
        return ControlResult(
            message=f"prefix cache flushed: {cached} cached block(s) dropped, {unshared} "
            "block(s) of live requests no longer shared"
        )

    def pause(self) -> ControlResult:
        if self.released:
            raise ControlConflict(
                f"the engine's memory is released ({', '.join(self.released_tags())}): nothing "
                "runs to pause"
            )
        if self._hold is not None:
            return ControlResult(message="already paused")
        hold = _PauseHold(self.manager)
        hold.enter()
        self._hold = hold
        return ControlResult(message="paused in place: requests and their KV cache are kept")

    def resume_generation(self) -> ControlResult:
        hold, self._hold = self._hold, None
        if hold is None:
            return ControlResult(message="was not paused")
        hold.leave()
        return ControlResult(message="continued")

    def close(self) -> None:
        """At shutdown: no pause may outlive the engine, nor a released-weights file."""
        if self._hold is not None:
            self._hold.leave()
            self._hold = None
        if self._offloaded is not None:
            self._offloaded.discard()
            self._offloaded = None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ms(started: float) -> str:
    return f"{(time.monotonic() - started) * 1000:.0f} ms"
