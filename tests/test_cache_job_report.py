"""benchmarks/cache_job.py's arithmetic and report, without running a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cache_job")


def test_the_batch_clock_averages_the_time_from_the_first_forward_to_the_last(bench, monkeypatch):
    times = iter([10.0, 12.0, 15.0, 16.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(times))
    layer = torch.nn.Linear(2, 2)
    clock = bench.BatchClock(layer)
    for _ in range(4):
        layer(torch.zeros(1, 2))
    assert clock.step() == pytest.approx(2.0)  # (16 - 10) / 3 intervals


def test_the_committed_report_is_what_its_json_gives(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "HERE", tmp_path)
    bench.write_report(json.loads((RESULTS / "cache_job.json").read_text()))
    assert (tmp_path / "results" / "cache_job.md").read_text() == (RESULTS / "cache_job.md").read_text()


def test_a_run_from_before_the_steady_state_columns_still_reports(bench, tmp_path, monkeypatch):
    results = json.loads((RESULTS / "cache_job.json").read_text())
    for key in ("batches_per_pass", "median_step_ratio_to_bare", "round_step_ratios_to_bare", "median_fixed_seconds"):
        del results[key]
    monkeypatch.setattr(bench, "HERE", tmp_path)
    bench.write_report(results)
    table = (tmp_path / "results" / "cache_job.md").read_text()
    assert "| cache job, zarr, top-64 | " in table and "| steady-state ratio |" not in table
