"""The requests an engine has taken and not yet ended: one table for every engine, so that each
request ends exactly once and is counted once, however it ends (finished, cancelled, failed,
or failed with every other one when the engine stops).

Not thread-safe by itself: an engine that uses it from more than one thread holds its own lock
around every call, the one that also guards its Counters. Side effects on the engine (telling
it to cancel, forgetting per-request books) are the caller's, after the call, so that they can
run outside that lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from tensorgate.executor.engine import Counters, add_finished
from tensorgate.v1 import executor_pb2 as pb

S = TypeVar("S")


class LiveRequests(Generic[S]):
    """Server request id -> the engine's state for it, and optionally the engine's own id for
    it (TensorRT-LLM numbers requests itself) -> the server id."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._states: dict[int, S] = {}
        self._engine_ids: dict[int, Hashable] = {}
        self._by_engine_id: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, rid: object) -> bool:
        return rid in self._states

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def add(self, rid: int, state: S, engine_id: Hashable | None = None) -> None:
        """A request the engine has taken. Ids are unique among live requests (the server
        maps them); a second live one with the same id is a bug in the caller."""
        if rid in self._states:
            raise ValueError(f"request id {rid} is already in flight")
        self._states[rid] = state
        if engine_id is not None:
            self._engine_ids[rid] = engine_id
            self._by_engine_id[engine_id] = rid

    def get(self, rid: int) -> S | None:
        return self._states.get(rid)

    def rid_of(self, engine_id: Hashable) -> int | None:
        """The server id of the engine's request; None once it has ended (late responses for
        a cancelled request land here)."""
        return self._by_engine_id.get(engine_id)

    def forget(self, rid: int) -> S | None:
        """Removes a request that never started after all (the engine refused it as it was
        handed over). Nothing is counted and no output written: the caller reports it."""
        return self._remove(rid)

    def finish(self, rid: int, reason: int) -> S | None:
        """Ends a live request with `reason` and counts it (CANCELLED as cancelled, ERROR as
        failed, any other as finished); the caller writes its final output. None, and nothing
        counted, when it is not live: it ended already."""
        state = self._remove(rid)
        if state is None:
            return None
        c = self._counters
        if reason == pb.FINISH_REASON_CANCELLED:
            c.requests_cancelled += 1
        elif reason == pb.FINISH_REASON_ERROR:
            c.requests_failed += 1
        else:
            c.requests_finished += 1
        return state

    def cancel(self, rids: Iterable[int], batch: pb.IterationOutput) -> list[tuple[int, S]]:
        """Ends the live ones among `rids` with a CANCELLED output in `batch`; unknown or
        already ended ids are ignored. Returns what was cancelled, for the engine to stop."""
        cancelled = []
        for rid in rids:
            state = self.finish(rid, pb.FINISH_REASON_CANCELLED)
            if state is not None:
                add_finished(batch, rid, pb.FINISH_REASON_CANCELLED)
                cancelled.append((rid, state))
        return cancelled

    def fail(self, rid: int, message: str, batch: pb.IterationOutput) -> S | None:
        """Ends one live request with an ERROR output carrying `message`."""
        state = self.finish(rid, pb.FINISH_REASON_ERROR)
        if state is not None:
            add_finished(batch, rid, pb.FINISH_REASON_ERROR, message)
        return state

    def fail_all(self, message: str, batch: pb.IterationOutput) -> list[tuple[int, S]]:
        """Ends every live request with an ERROR output carrying `message` (the engine is
        stopping or has failed). Returns what was failed."""
        failed = []
        for rid in list(self._states):
            state = self.fail(rid, message, batch)
            assert state is not None
            failed.append((rid, state))
        return failed

    def _remove(self, rid: int) -> S | None:
        state = self._states.pop(rid, None)
        engine_id = self._engine_ids.pop(rid, None)
        if engine_id is not None:
            self._by_engine_id.pop(engine_id, None)
        return state
