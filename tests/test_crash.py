"""Real jobs killed with SIGKILL at random moments, then rerun: nothing lost, nothing changed.

One trial of each kind in the default suite and a second under ``-m slow``, to keep the default
suite short; the harness is tools/soak.py, which runs the same trials many times for soak testing."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import soak  # noqa: E402


TRIALS = [0, pytest.param(1, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def setup(tiny_teacher, corpus_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("crash")
    student = work / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "max_position_embeddings": 64}))
    store, run, seconds = soak.references(work, str(tiny_teacher), str(corpus_file), student)
    return work, str(tiny_teacher), str(corpus_file), student, store, run, seconds


@pytest.mark.parametrize("trial", TRIALS)
def test_a_killed_teacher_job_reruns_to_identical_shards(setup, trial):
    work, teacher, data, _, store, _, seconds = setup
    result = soak.teacher_trial(work, teacher, data, store, soak.kill_delay(random.Random(trial), seconds["teacher"]))
    assert result["identical"], result


@pytest.mark.parametrize("trial", TRIALS)
def test_a_killed_student_resumes_to_identical_weights(setup, trial):
    work, _, _, student, store, run, seconds = setup
    result = soak.student_trial(work, store, student, run, soak.kill_delay(random.Random(10 + trial), seconds["student"]))
    assert result["identical"], result


@pytest.mark.slow  # 35 s; a 2-rank resume is also tested by test_distributed.py::test_two_ranks_resume_an_interrupted_store
@pytest.mark.parametrize("trial", TRIALS)
def test_a_killed_two_rank_teacher_job_reruns_to_identical_shards(setup, trial):
    work, teacher, data, _, store, _, seconds = setup
    result = soak.teacher_trial(work, teacher, data, store, soak.kill_delay(random.Random(20 + trial), seconds["teacher"]),
                                ranks=True)
    assert result["identical"], result
