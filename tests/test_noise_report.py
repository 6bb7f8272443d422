"""The noise benchmark's arithmetic: what the README quotes about how much a regime can resolve."""

from __future__ import annotations

import math

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def noise():
    return load_benchmark("noise")


def test_paired_and_unpaired_spread(noise):
    # Row b is row a plus 0.1 whatever the seed: no paired spread, while the seeds themselves differ.
    runs = {"0": {"a": 6.0, "b": 6.1}, "1": {"a": 6.4, "b": 6.5}, "2": {"a": 6.2, "b": 6.3}}
    assert noise.paired_sd(runs, "b", "a") == (pytest.approx(0.0, abs=1e-12), 3)
    spread, count = noise.paired_sd(runs, "b", "a", paired=False)  # 6.1-6.4, 6.5-6.2, 6.3-6.0
    assert count == 3 and spread == pytest.approx(math.sqrt(((-0.3 - 0.1) ** 2 + 0.2 ** 2 + 0.2 ** 2) / 2))
    assert math.isnan(noise.paired_sd({"0": runs["0"]}, "b", "a")[0])


def test_summary_resolves_in_one_cpu_hour(noise):
    reference, rows = noise.REFERENCE, noise.KD_ROWS
    differences = {"0": 0.00, "1": 0.02, "2": 0.04}  # of every other KD row against the reference: sd 0.02
    runs = {seed: {"ce": 6.5 + step, reference: 6.3, **{row: 6.3 + step for row in rows[1:]}}
            for seed, step in differences.items()}
    s = noise.summary({"held_out_ce": runs, "seconds_per_step": 1.5, "steps": 120})
    assert s["cost"] == pytest.approx(3.0)  # 120 steps of 1.5 s, in minutes
    assert s["seeds"] == 3 and s["gain_seeds"] == 3
    runs["3"] = {"ce": 6.6, reference: 6.4}  # a seed that trained only the two references
    partial = noise.summary({"held_out_ce": runs, "seconds_per_step": 1.5, "steps": 120})
    assert partial["seeds"] == 3 and partial["gain_seeds"] == 4
    del runs["3"]
    assert s["gain"] == pytest.approx(0.22) and s["gain_se"] == pytest.approx(0.02 / math.sqrt(3))
    # The pairs (reference, x) and (reference, y) spread by 0.02; x and y are equal in every seed.
    assert list(s["pair_noise"].values()) == [pytest.approx(0.02), pytest.approx(0.02), pytest.approx(0.0, abs=1e-12)]
    assert s["noise"] == pytest.approx(math.sqrt((0.02 ** 2 + 0.02 ** 2 + 0) / 3))
    # One CPU-hour on two rows of 3 minutes each: 10 seeds.
    assert s["resolves"] == pytest.approx(2 * s["noise"] / math.sqrt(10))
    assert s["versus_reference"]["ce"] == (pytest.approx(0.22), pytest.approx(0.02 / math.sqrt(3)))
