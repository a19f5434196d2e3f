"""The benchmark-only timing of guided decoding: histograms, percentiles, the file it writes,
and that it is off (nothing recorded, no thread) unless the environment asks for it."""

from __future__ import annotations

import json
import math

import pytest

from tensorgate.executor.engines import guided_timing
from tensorgate.executor.engines.guided_timing import (
    GuidedTiming,
    Histogram,
    bucket_bounds_us,
    bucket_of,
    percentile_us,
)


@pytest.mark.parametrize("ns", [1_500, 80_000, 480_000, 18_000_000])
def test_a_value_falls_in_the_bucket_whose_bounds_hold_it(ns):
    lo, hi = bucket_bounds_us(bucket_of(ns))
    assert lo <= ns / 1000 < hi
    assert hi / lo < 1.13  # 20 buckets a decade


def test_percentiles_of_a_known_distribution():
    h = Histogram()
    for _ in range(98):
        h.add(100_000)  # 100 µs
    h.add(5_000_000, weight=2)  # 5 ms, twice
    assert h.n == 100 and h.total_ns == 98 * 100_000 + 2 * 5_000_000
    assert math.isclose(percentile_us(h.counts, 50), 100, rel_tol=0.06)
    assert math.isclose(percentile_us(h.counts, 99), 5000, rel_tol=0.06)
    assert math.isnan(percentile_us([0] * len(h.counts), 50))


def test_per_row_records_divide_the_step_and_count_each_row(tmp_path):
    t = GuidedTiming(tmp_path / "t.json", interval_s=3600)
    t.record_step("mask", 4, 2_000_000)  # 2 ms over four rows
    t.write()
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["mask_step"]["n"] == 1 and doc["mask_row"]["n"] == 4
    assert math.isclose(percentile_us(doc["mask_row"]["counts"], 50), 500, rel_tol=0.06)
    assert doc["consume_row"]["n"] == 0 and len(doc["bucket_high_us"]) == len(
        doc["mask_row"]["counts"]
    )


def test_off_unless_the_environment_names_a_file(monkeypatch):
    monkeypatch.delenv(guided_timing.ENV, raising=False)
    monkeypatch.setattr(guided_timing, "_read", False)
    monkeypatch.setattr(guided_timing, "_instance", None)
    assert guided_timing.from_env() is None


def test_on_when_the_environment_names_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv(guided_timing.ENV, str(tmp_path / "timing.json"))
    monkeypatch.setattr(guided_timing, "_read", False)
    monkeypatch.setattr(guided_timing, "_instance", None)
    t = guided_timing.from_env()
    assert t is not None and guided_timing.from_env() is t  # one per process
    t.record_build(1_000_000)
    t.write()
    assert json.loads((tmp_path / "timing.json").read_text())["build"]["n"] == 1


def test_the_sampler_records_the_mask_and_the_consume_of_constrained_rows_only(tmp_path):
    import torch
    from test_cb_sampling import FakeGrammar, FakeMatcher, apply, future

    from tensorgate.executor.engines.cb_sampling import (
        LogprobBook,
        PerRequestSampler,
        RowSpec,
        RowState,
    )

    t = GuidedTiming(tmp_path / "t.json", interval_s=3600)
    sampler = PerRequestSampler(LogprobBook(), FakeGrammar(), t)
    rows = [future(str(i), RowSpec(), row=RowState([1], FakeMatcher([4]))) for i in range(3)]
    apply(sampler, [*rows, future("plain", None)], torch.randn(4, 40))
    assert t.hist["mask_step"].n == 1 and t.hist["mask_row"].n == 3
    assert t.hist["consume_step"].n == 1 and t.hist["consume_row"].n == 3
    assert t.hist["call_step"].n == 1 and t.hist["call_row"].n == 3
    apply(sampler, [future("plain", RowSpec(logprobs=True))], torch.randn(1, 40))
    # A row without a grammar costs the grammar nothing, and the call is not counted.
    assert t.hist["mask_step"].n == 1 and t.hist["call_step"].n == 1
