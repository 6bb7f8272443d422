"""Multi-process jobs under torchrun (gloo on CPU): the teacher job on 2 ranks, DDP students."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from softcache import open_store
from softcache.cache_job import run_cache
from softcache.store import StoreWriter


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "softcache",
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def cache_args(config) -> list:
    return ["cache", "--teacher", config.teacher, "--data", config.data, "--out", config.out, "--seq-len",
            config.seq_len, "--max-sequences", config.max_sequences, "--k", config.k, "--batch-size",
            config.batch_size, "--shard-size", config.shard_size, "--targets", config.targets, "--samples",
            config.samples, "--no-progress"]


def test_two_rank_teacher_job_writes_the_one_rank_store(cache_config, tmp_path):
    one = cache_config(targets="sampled", samples=10, out=str(tmp_path / "one"))
    run_cache(one)
    two = cache_config(targets="sampled", samples=10, out=str(tmp_path / "two"))
    result = torchrun(*cache_args(two))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 24 sequences") == 1  # one summary, from rank 0
    a, b = open_store(one.out), open_store(two.out)
    assert b.complete and b.verify() == []
    assert a.manifest["totals"]["content_sha256"] == b.manifest["totals"]["content_sha256"]
    assert [s["content_sha256"] for s in a.shards] == [s["content_sha256"] for s in b.shards]


def test_two_ranks_resume_an_interrupted_store(cache_config, tmp_path, monkeypatch):
    reference = cache_config(out=str(tmp_path / "reference"))
    run_cache(reference)
    interrupted = cache_config(out=str(tmp_path / "interrupted"))
    original = StoreWriter.write_shard

    def crash_on_third_shard(self, index, columns, **stats):
        if index == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, index, columns, **stats)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_cache(interrupted)
    monkeypatch.setattr(StoreWriter, "write_shard", original)
    kept = {f["path"]: os.stat(tmp_path / "interrupted" / f["path"]).st_mtime_ns
            for s in open_store(interrupted.out, allow_incomplete=True).shards for f in s["files"]}
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
