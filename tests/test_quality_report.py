"""The quality benchmark's arithmetic: the figures the README quotes come from these functions."""

from __future__ import annotations

import math

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def _row(ce: float, seconds: float = 10.0, size: float | None = None) -> dict:
    return {"ce": ce, "ece": 0.01, "kl": 1.0, "top1_agreement": 0.5, "seconds": seconds, "bytes_per_token": size}


def _results(quality) -> dict:
    online = quality.ONLINE
    return {
        "machine": "test", "steps": 3, "alpha": 0.5, "batch_size": 2, "seq_len": 8, "lr": 0.1, "seed": 0,
        "seeds": [0, 1, 2], "student": {}, "teacher_job_seconds": {"train": 5.0}, "teacher_heldout_ce": 2.0,
        "train_tokens": 100,
        "seeded": {
            "0": {"ce": _row(6.0), "sampled N=50": _row(5.5, size=32.0), "top8": _row(5.9, size=20.0),
                  online: _row(5.0, seconds=40.0)},
            "1": {"ce": _row(6.2), "sampled N=50": _row(6.3, size=32.0), online: _row(6.4, seconds=44.0)},
            "2": {"ce": _row(5.8), "sampled N=50": _row(5.4, size=32.0), online: _row(5.6, seconds=42.0)},
        },
    }


def test_gap_closed_is_measured_against_the_same_seeds_ce_and_online_runs(quality):
    by_name = _results(quality)["seeded"]["0"]
    assert quality.gap_closed(by_name, "sampled N=50") == pytest.approx(0.5)
    assert quality.gap_closed(by_name, "ce") == 0.0 and quality.gap_closed(by_name, quality.ONLINE) == 1.0
    assert math.isnan(quality.gap_closed(_results(quality)["seeded"]["1"], "sampled N=50"))  # online lost to CE
    assert quality.percent(float("nan")) == "n/a" and quality.percent(1.07) == "107%"


def test_paired_differences_are_mean_and_standard_error_over_seeds(quality):
    seeded = _results(quality)["seeded"]
    # sampled - online per seed: 0.5, -0.1, -0.2 -> mean 0.0667, sd 0.3786, s.e. 0.2186
    assert quality.paired(seeded, "sampled N=50", quality.ONLINE) == "+0.067 ± 0.219"
    assert quality.paired(seeded, quality.ONLINE, quality.ONLINE) == ""


def test_report_tables_seed_zero_and_the_seeds(quality, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "HERE", tmp_path)
    quality.write_report(_results(quality))
    report = (tmp_path / "results" / "quality.md").read_text()
    assert "| top8 | 5.900 | 10% |" in report  # seed 0 only, not in the seeds table
    # sampled - ce per seed: -0.5, 0.1, -0.4 (s.e. 0.186); mean CEs: ce 6.0, sampled 5.733, online 5.667 -> 80% of
    # the mean gap; online median 42 s / 10 s
    assert ("| sampled N=50 | 5.500 / 6.300 / 5.400 | 5.733 | -0.267 ± 0.186 | +0.067 ± 0.219 | "
            "50% / n/a / 200% | 80% | 10 s | 4.2x |") in report
    assert "| top8 | 5.900 / " not in report
