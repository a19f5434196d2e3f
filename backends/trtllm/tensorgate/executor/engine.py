"""The interface every engine implements (trtllm, transformers, synthetic).

An engine runs its own loop (a thread or a task), takes new requests and cancellations at any
time, and hands the server one batch of outputs per engine iteration through `emit`, so the
executor sends O(iterations) messages, not O(tokens). It never detokenizes.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tensorgate.v1 import executor_pb2 as pb

# One iteration's outputs, in the wire type so that no copy is needed on the way out.
Emit = Callable[[list[pb.RequestOutput]], None]


class EngineError(Exception):
    """The engine cannot start or cannot serve; the message is for the user."""


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_num_tokens: int
    max_top_n_tokens: int = 0


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    engine: str
    dtype: str
    device: str
    vocab_size: int
    eos_token_ids: list[int]
    limits: EngineLimits
    kv_capacity_tokens: int
    features: dict[str, bool] = field(default_factory=dict)

    def to_proto(self, version: str) -> pb.InfoResponse:
        lim = self.limits
        return pb.InfoResponse(
            model_id=self.model_id,
            engine=self.engine,
            dtype=self.dtype,
            device=self.device,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            limits=pb.Limits(
                max_batch_size=lim.max_batch_size,
                max_input_tokens=lim.max_input_tokens,
                max_total_tokens=lim.max_total_tokens,
                max_num_tokens=lim.max_num_tokens,
                max_top_n_tokens=lim.max_top_n_tokens,
            ),
            kv_capacity_tokens=self.kv_capacity_tokens,
            features=pb.Features(**self.features),
            executor_version=version,
        )


@dataclass
class Counters:
    """Lifetime counters reported by Stats; updated from the engine's loop only."""

    iterations: int = 0
    requests_received: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    last_iteration_ms: float = 0.0


def finished(request_id: int, reason: int, error: str = "") -> pb.RequestOutput:
    return pb.RequestOutput(request_id=request_id, finish_reason=reason, error=error)


def check_request(req: pb.GenerateRequest, limits: EngineLimits) -> str | None:
    """The engine-side guard: the router validates first, but a request over the engine's
    limits must fail with a message rather than break the engine."""
    n = len(req.input_ids)
    if n == 0:
        return "input_ids is empty"
    if n > limits.max_input_tokens:
        return f"prompt has {n} tokens; the engine's max_input_tokens is {limits.max_input_tokens}"
    if req.max_new_tokens == 0:
        return "max_new_tokens must be at least 1"
    if n + req.max_new_tokens > limits.max_total_tokens:
        return (
            f"prompt ({n}) + max_new_tokens ({req.max_new_tokens}) exceeds the engine's "
            f"max_total_tokens of {limits.max_total_tokens}"
        )
    if req.top_n_tokens > limits.max_top_n_tokens:
        return f"top_n_tokens {req.top_n_tokens} exceeds {limits.max_top_n_tokens}"
    return None


class Engine(abc.ABC):
    """Lifecycle: construct (loads), `start(emit)`, then `submit`/`cancel` from any thread,
    `stats()` at any time, `shutdown()` once."""

    def __init__(self) -> None:
        self.counters = Counters()

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def start(self, emit: Emit) -> None:
        """Starts the engine loop; `emit` is called from the loop once per iteration."""

    @abc.abstractmethod
    def submit(self, requests: list[pb.GenerateRequest]) -> None:
        """Queues requests. Ids are unique among live requests (the server maps them)."""

    @abc.abstractmethod
    def cancel(self, request_ids: list[int]) -> None:
        """Stops requests; each live one ends with a FINISH_REASON_CANCELLED output."""

    @abc.abstractmethod
    def stats(self) -> pb.StatsResponse: ...

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stops the loop; live requests end with an error output."""

    def health(self) -> tuple[bool, str]:
        return True, ""


class Inbox:
    """Requests and cancellations handed from the server's thread to the engine loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[pb.GenerateRequest] = []
        self._cancels: list[int] = []
        self.wake = threading.Event()

    def put_requests(self, requests: list[pb.GenerateRequest]) -> None:
        with self._lock:
            self._requests.extend(requests)
        self.wake.set()

    def put_cancels(self, ids: list[int]) -> None:
        with self._lock:
            self._cancels.extend(ids)
        self.wake.set()

    def drain(self) -> tuple[list[pb.GenerateRequest], list[int]]:
        with self._lock:
            reqs, self._requests = self._requests, []
            cancels, self._cancels = self._cancels, []
            self.wake.clear()
        return reqs, cancels
