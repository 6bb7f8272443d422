"""Multi-process jobs under torchrun (gloo on CPU): the teacher job on 2 ranks, DDP students."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from softcache import open_store
from softcache.cache_job import run_cache
from softcache.store import StoreWriter

from conftest import interrupted as interrupted_run


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "softcache", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def cache_args(config) -> list:
    return ["cache", "--teacher", config.teacher, "--data", config.data, "--out", config.out, "--seq-len",
            config.seq_len, "--max-sequences", config.max_sequences, "--k", config.k, "--batch-size",
            config.batch_size, "--shard-size", config.shard_size, "--targets", config.targets, "--samples",
            config.samples, "--no-progress"]


def test_two_rank_teacher_job_writes_the_one_rank_store_at_a_url(cache_config, tmp_path, monkeypatch):
    """Two ranks write the store of one rank, byte for byte in content, to a URL as to a directory."""
    one = cache_config(targets="sampled", samples=10, out=str(tmp_path / "one"))
    run_cache(one)
    two = cache_config(targets="sampled", samples=10, out=f"file://{tmp_path / 'bucket' / 'store'}")
    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "mirror"))
    result = torchrun(*cache_args(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 24 sequences") == 1  # one summary, from rank 0
    assert not (tmp_path / "bucket" / "store" / "progress").exists()
    a, b = open_store(one.out), open_store(str(tmp_path / "bucket" / "store"))
    assert b.complete and b.verify() == []
    assert a.manifest["totals"]["content_sha256"] == b.manifest["totals"]["content_sha256"]
    assert [s.content_sha256 for s in a.shards] == [s.content_sha256 for s in b.shards]


@pytest.mark.slow  # 17 s; a one-rank resume: test_crash.py and test_cache_job.py, two ranks: the test above
def test_two_ranks_resume_an_interrupted_store(cache_config, tmp_path, monkeypatch):
    reference = cache_config(out=str(tmp_path / "reference"))
    run_cache(reference)
    interrupted = cache_config(out=str(tmp_path / "interrupted"))
    interrupted_run(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(interrupted))
    kept = {f.path: os.stat(tmp_path / "interrupted" / f.path).st_mtime_ns
            for s in open_store(interrupted.out, allow_incomplete=True).shards for f in s.files}
    result = torchrun(*cache_args(interrupted))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path: os.stat(tmp_path / "interrupted" / path).st_mtime_ns for path in kept} == kept  # not rewritten
    assert (open_store(interrupted.out).manifest["totals"]["content_sha256"]
            == open_store(reference.out).manifest["totals"]["content_sha256"])


def test_a_refusal_on_rank_0_stops_every_rank(cache_config, tmp_path):
    run_cache(cache_config(out=str(tmp_path / "s")))
    changed = cache_config(out=str(tmp_path / "s"), k=16)
    result = torchrun(*cache_args(changed))
    assert result.returncode != 0
    assert result.stderr.count("holds a different store") == 2  # both ranks say why, neither hangs


@pytest.fixture
def student_store(cache_config, tmp_path):
    import json

    store = cache_config(out=str(tmp_path / "store"), max_sequences=24)
    run_cache(store)
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "max_position_embeddings": 64}))
    return store.out, str(student)


def train_args(store: str, student: str, out, batch_size: int, steps: int = 4, *extra) -> list:
    return ["train", "--store", store, "--student", student, "--out", out, "--steps", steps, "--batch-size",
            batch_size, "--lr", "5e-3", "--checkpoint-every", 2, "--num-workers", 0, "--no-progress", *extra]


def metrics(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_student_matches_one_rank_with_the_same_global_batch(student_store, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from softcache.cli import main
    from click.testing import CliRunner

    store, student = student_store
    one = CliRunner().invoke(main, [str(a) for a in train_args(store, student, tmp_path / "one", 4)])
    assert one.exit_code == 0, one.output
    two = torchrun(*train_args(store, student, tmp_path / "two", 2))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]  # the same global batches
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["kd"] == pytest.approx(x["kd"], rel=1e-5)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000000002.pt",
                                                                                   "step-000000004.pt"]


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_two_rank_lora_student_with_the_fused_loss_matches_one_rank(student_store, tmp_path):
    """DDP around a frozen student whose adapters train (issue 15): gradients of the adapters only."""
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from softcache.cli import main

    from conftest import make_student

    store, _ = student_store
    student = str(make_student(tmp_path / "pretrained"))
    lora = ("--lora-r", 4, "--fused-linear", "on")
    one = CliRunner().invoke(main, [str(a) for a in train_args(store, student, tmp_path / "one", 4, 4, *lora)])
    assert one.exit_code == 0, one.output
    two = torchrun(*train_args(store, student, tmp_path / "two", 2, 4, *lora))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "not a plain linear head" not in one.output + two.stderr  # the fused loss ran
    for x, y in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert x["tokens"] == y["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["kd"] == pytest.approx(x["kd"], rel=1e-5)
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_a_run_resumes_on_another_number_of_ranks(student_store, tmp_path, monkeypatch):
    import torch

    from softcache.config import TrainConfig
    from softcache.train_job import run_train

    store, student = student_store
    reference = tmp_path / "reference"
    run_train(TrainConfig(store=store, student=student, out=str(reference), steps=4, batch_size=4, lr=5e-3,
                          checkpoint_every=2, num_workers=0, progress=False))
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 3, lambda: run_train(TrainConfig(
        store=store, student=student, out=str(tmp_path / "run"), steps=4, batch_size=4, lr=5e-3, checkpoint_every=2,
        num_workers=0, progress=False)))
    refused = torchrun(*train_args(store, student, tmp_path / "run", 4, 4, "--resume"))
    assert refused.returncode != 0 and "global batch (--batch-size x ranks): run has 4 x 1, now 4 x 2" in refused.stderr
    resumed = torchrun(*train_args(store, student, tmp_path / "run", 2, 4, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, theirs = metrics(tmp_path / "run"), metrics(reference)
    assert [m["step"] for m in ours] == [1, 2, 3, 4]
    for x, y in zip(ours, theirs):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_ranks_of_a_process_group_read_every_sequence_once_per_epoch(student_store, tmp_path):
    import json

    store, _ = student_store
    script = tmp_path / "read.py"
    script.write_text(f"""
import json, torch.distributed as dist
from softcache.data import StoreDataset
dist.init_process_group("gloo")
dataset = StoreDataset({store!r}, batch_size=5, epochs=1, seed=3)
rows = [int(r) for batch in dataset for r, ok in zip(batch["input_ids"][:, 0].tolist(), batch["mask"][:, 0]) if ok]
steps = [int(batch["step"]) for batch in StoreDataset({store!r}, batch_size=5, epochs=1, seed=3)]
json.dump({{"first_tokens": rows, "steps": steps}}, open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w"))
dist.destroy_process_group()
""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [0, 1, 2]  # ceil(24 / (5 x 2)): equal batch counts
    seen = sorted(ranks[0]["first_tokens"] + ranks[1]["first_tokens"])
    expected = sorted(open_store(store).read(0, 24)["input_ids"][:, 0].tolist())
    assert seen == expected  # every sequence once, none twice


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_many_students_read_one_store_at_once(student_store, tmp_path):
    """Three student jobs on one store at the same time: all finish, and each equals a run alone."""
    store, student = student_store
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "softcache", *map(str, train_args(store, student, "OUT", 2, 6))]
    jobs = [subprocess.Popen([part if part != "OUT" else str(tmp_path / f"run{i}") for part in command],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for i in range(3)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()[-2000:]
    alone = subprocess.run([part if part != "OUT" else str(tmp_path / "alone") for part in command],
                           capture_output=True, text=True, env=env)
    assert alone.returncode == 0, alone.stderr[-2000:]
    reference = metrics(tmp_path / "alone")
    for i in range(3):
        assert metrics(tmp_path / f"run{i}") == [{**m, "tokens_per_s": r["tokens_per_s"]}
                                                  for m, r in zip(reference, metrics(tmp_path / f"run{i}"))]
