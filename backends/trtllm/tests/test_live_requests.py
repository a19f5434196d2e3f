"""The live-request table every engine shares: each request ends once, is counted once by how
it ended, and cancel / fail-all write the final outputs."""

from __future__ import annotations

import pytest

from tensorgate.executor.engine import Counters
from tensorgate.executor.live_requests import LiveRequests
from tensorgate.v1 import executor_pb2 as pb


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def table(counters) -> LiveRequests[str]:
    return LiveRequests(counters)


def ends(batch: pb.IterationOutput) -> list[tuple[int, int, str]]:
    return [(o.request_id, o.finish_reason, o.error) for o in batch.outputs]


def test_add_get_and_membership(table):
    table.add(1, "one")
    table.add(2, "two", engine_id=77)
    assert len(table) == 2 and 1 in table and 3 not in table
    assert list(table) == [1, 2]
    assert table.get(2) == "two" and table.get(3) is None
    assert table.rid_of(77) == 2 and table.rid_of(1) is None


def test_a_second_live_request_with_the_same_id_is_refused(table):
    table.add(1, "one")
    with pytest.raises(ValueError, match="request id 1 is already in flight"):
        table.add(1, "again")
    assert table.get(1) == "one"


@pytest.mark.parametrize(
    ("reason", "counter"),
    [
        (pb.FINISH_REASON_LENGTH, "requests_finished"),
        (pb.FINISH_REASON_EOS_TOKEN, "requests_finished"),
        (pb.FINISH_REASON_STOP_TOKEN, "requests_finished"),
        (pb.FINISH_REASON_CANCELLED, "requests_cancelled"),
        (pb.FINISH_REASON_ERROR, "requests_failed"),
    ],
)
def test_finish_counts_once_by_how_it_ended(table, counters, reason, counter):
    table.add(1, "one", engine_id="e1")
    assert table.finish(1, reason) == "one"
    assert table.finish(1, reason) is None  # ended already: not counted again
    assert getattr(counters, counter) == 1
    others = {"requests_finished", "requests_cancelled", "requests_failed"} - {counter}
    assert all(getattr(counters, name) == 0 for name in others)
    assert 1 not in table and table.rid_of("e1") is None


def test_cancel_ends_the_live_ones_and_ignores_the_rest(table, counters):
    for rid in (1, 2, 3):
        table.add(rid, f"r{rid}", engine_id=100 + rid)
    table.finish(3, pb.FINISH_REASON_LENGTH)
    batch = pb.IterationOutput()
    cancelled = table.cancel([2, 3, 42, 2], batch)
    assert cancelled == [(2, "r2")]
    assert ends(batch) == [(2, pb.FINISH_REASON_CANCELLED, "")]
    assert counters.requests_cancelled == 1
    assert table.rid_of(102) is None  # a late response for it finds no request
    assert list(table) == [1]


def test_fail_ends_one_with_its_message(table, counters):
    table.add(1, "one")
    batch = pb.IterationOutput()
    assert table.fail(1, "bad logprobs", batch) == "one"
    assert table.fail(1, "again", batch) is None
    assert ends(batch) == [(1, pb.FINISH_REASON_ERROR, "bad logprobs")]
    assert counters.requests_failed == 1


def test_fail_all_ends_every_live_request_with_the_message(table, counters):
    for rid in (5, 6, 7):
        table.add(rid, f"r{rid}", engine_id=f"e{rid}")
    table.finish(6, pb.FINISH_REASON_EOS_TOKEN)
    batch = pb.IterationOutput()
    failed = table.fail_all("the executor is shutting down", batch)
    assert failed == [(5, "r5"), (7, "r7")]
    assert ends(batch) == [
        (5, pb.FINISH_REASON_ERROR, "the executor is shutting down"),
        (7, pb.FINISH_REASON_ERROR, "the executor is shutting down"),
    ]
    assert (counters.requests_failed, counters.requests_finished) == (2, 1)
    assert len(table) == 0 and table.rid_of("e5") is None
    again = pb.IterationOutput()
    assert table.fail_all("twice", again) == [] and not again.outputs


def test_forget_removes_without_counting(table, counters):
    table.add(1, "one", engine_id=9)
    assert table.forget(1) == "one"
    assert 1 not in table and table.rid_of(9) is None
    assert counters == Counters()
    table.add(1, "reused")  # the id is free again
