"""The command line: happy paths and one-line errors for bad flags and files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from softcache.cli import main
from conftest import store_files


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def base_args(tiny_teacher, corpus_file):
    return ["cache", "--teacher", tiny_teacher, "--data", corpus_file, "--seq-len", 32, "--max-sequences", 12,
            "--targets", "topk", "--k", 8, "--batch-size", 4, "--shard-size", 4, "--no-progress"]


def test_cache_info_verify_convert(base_args, tmp_path):
    store = tmp_path / "store"
    result = run(*base_args, "--out", store)
    assert result.exit_code == 0, result.output
    assert "wrote 12 sequences (384 tokens)" in result.output and "bytes/token" in result.output

    info = run("info", store)
    assert info.exit_code == 0
    words = " ".join(info.output.split())
    for expected in ("state complete", "top-8 log-probs", "vocab 384", "12 of 12 x 32 tokens", "3 of 3",
                     "teacher CE", "kind topk: biased"):
        assert expected in words
    machine = json.loads(run("info", store, "--json").output)
    assert machine["summary"]["sequences"] == 12 and machine["targets"]["k"] == 8

    assert run("verify", store).exit_code == 0
    converted = run("convert", store, tmp_path / "arrow", "--format", "arrow", "--no-progress")
    assert converted.exit_code == 0 and "(equal)" in converted.output
    assert run("verify", tmp_path / "arrow").exit_code == 0

    shard = tmp_path / "arrow" / "shards" / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    (tmp_path / "arrow" / "shards" / "shard-00002.arrow").unlink()
    broken = run("verify", tmp_path / "arrow")
    assert broken.exit_code == 1
    assert "shard 1: shards/shard-00001.arrow" in broken.output and "shard 2:" in broken.output

    again = run(*base_args, "--out", store)
    assert again.exit_code == 0 and "already complete" in again.output


def test_the_default_targets_are_16_systematic_draws_and_info_says_why(tiny_teacher, corpus_file, tmp_path):
    result = run("cache", "--teacher", tiny_teacher, "--data", corpus_file, "--out", tmp_path / "store", "--seq-len", 32,
                 "--max-sequences", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    targets = json.loads(run("info", tmp_path / "store", "--json").output)["targets"]
    assert targets["kind"] == "sampled" and targets["samples"] == 16 and targets["draws"] == "systematic"
    words = " ".join(run("info", tmp_path / "store").output.split())
    assert "kind sampled: unbiased" in words and "the default, for the best quality per byte" in words


def test_ranked_ids_from_the_job_and_by_conversion_hold_the_same_content(base_args, tmp_path):
    from softcache.store import open_store

    sampled = ["--targets", "sampled", "--samples", 12, "--shard-size", 5]
    ranked, delta = tmp_path / "ranked", tmp_path / "delta"
    assert run(*base_args, *sampled, "--out", ranked, "--ids", "ranked").exit_code == 0
    assert run(*base_args, *sampled, "--out", delta, "--ids", "delta").exit_code == 0
    a, b = open_store(ranked), open_store(delta)
    assert a.manifest["format_version"] == 5 and b.manifest["format_version"] == 3
    assert a.totals.content_sha256 == b.totals.content_sha256 and a.verify() == []
    assert all(np.array_equal(x, y) for x, y in zip(a.read(0, 12).values(), b.read(0, 12).values()))
    assert "ids ranked" in " ".join(run("info", ranked).output.split())
    # Converted either way, the content digest is checked equal; the ranks are on disk only.
    back = run("convert", ranked, tmp_path / "back", "--format", "arrow", "--ids", "delta", "--no-progress")
    assert back.exit_code == 0 and "(equal)" in back.output, back.output
    assert open_store(tmp_path / "back").encoding.ids == "delta"
    again = run("convert", tmp_path / "back", tmp_path / "again", "--format", "zarr", "--ids", "ranked", "--no-progress")
    assert again.exit_code == 0 and "(equal)" in again.output
    assert store_files(tmp_path / "again")["data.zarr/shards/00001/target_ids/c/0"] == \
        store_files(ranked)["data.zarr/shards/00001/target_ids/c/0"]
    # A code whose columns differ in memory is no conversion of the same content.
    assert run(*base_args, *sampled, "--out", tmp_path / "plain", "--ids", "plain").exit_code == 0
    refused = run("convert", tmp_path / "plain", tmp_path / "no", "--format", "zarr", "--ids", "ranked")
    assert refused.exit_code == 1 and refused.output.startswith("error: --ids ranked: a conversion keeps the content")
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "no" / "manifest.json").exists()


def test_a_store_of_the_old_defaults_is_refused_by_the_new_ones_in_one_line_naming_the_flags(tiny_teacher,
                                                                                            corpus_file, tmp_path):
    base = ["cache", "--teacher", tiny_teacher, "--data", corpus_file, "--out", tmp_path / "old", "--seq-len", 32,
            "--max-sequences", 8, "--batch-size", 4, "--shard-size", 4, "--no-progress"]
    assert run(*base, "--ids", "delta", "--samples", 24).exit_code == 0  # as softcache wrote by default before
    refused = run(*base)
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert 'encoding.ids: store has "delta", this run "ranked"' in refused.output
    assert "targets.samples: store has 24, this run 16" in refused.output
    assert run(*base, "--ids", "delta", "--samples", 24).exit_code == 0  # the README's way back in


def test_incomplete_store_in_info_and_verify(base_args, tmp_path, monkeypatch):
    from softcache.store.zarr_format import ZarrFormat

    original = ZarrFormat.write_shard

    def disk_full_at_second_shard(self, root, layout, encoding, index, columns):
        if index == 1:
            raise OSError(28, "No space left on device")
        return original(self, root, layout, encoding, index, columns)

    monkeypatch.setattr(ZarrFormat, "write_shard", disk_full_at_second_shard)
    failed = run(*base_args, "--out", tmp_path / "s")
    assert failed.exit_code == 1
    assert failed.output.startswith("error: could not write shard 1") and "No space left on device" in failed.output
    assert "rerun the same command to resume" in failed.output
    monkeypatch.setattr(ZarrFormat, "write_shard", original)
    info = run("info", tmp_path / "s")
    assert info.exit_code == 0 and "INCOMPLETE: 1 of 3 shards written" in info.output
    verify = run("verify", tmp_path / "s")
    assert verify.exit_code == 1 and "incomplete" in verify.output


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--k": 0}, "--k must be at least 1, got 0"),
        ({"--seq-len": 1}, "--seq-len must be at least 2, got 1"),
        ({"--temperature": 0}, "--temperature must be greater than 0"),
        ({"--temperature": "nan"}, "--temperature must be greater than 0"),
        ({"--batch-size": 0}, "--batch-size must be at least 1"),
        ({"--shard-size": 0}, "--shard-size must be at least 1"),
        ({"--max-sequences": 0}, "--max-sequences must be at least 1"),
        ({"--device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N"),
        ({"--data": "missing.jsonl"}, "--data missing.jsonl does not exist"),
        ({"--teacher": "./no-such-model"}, "--teacher ./no-such-model is not a directory"),
        ({"--text-column": "body"}, "has no column 'body'"),
        ({"--teacher": "builtin:gpt5"}, "unknown built-in teacher"),
        ({"--targets": "topp", "--top-p": 0}, "--top-p must be in (0, 1], got 0.0"),
        ({"--targets": "sampled", "--samples": 0}, "--samples must be at least 1, got 0"),
        ({"--targets": "sampled", "--values": "log8"}, "--values for --targets sampled must be one of counts"),
        ({"--values": "counts"}, "--values for --targets topk must be one of float16, log8, got 'counts'"),
    ],
)
def test_bad_flags_give_one_line(base_args, tmp_path, change, message):
    args = list(base_args) + ["--out", tmp_path / "s"]
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output


def test_bad_paths_give_one_line(base_args, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in run(*base_args, "--out", tmp_path / "file").output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    result = run(*base_args, "--out", tmp_path / "busy")
    assert result.exit_code == 1 and "not empty and holds no softcache store" in result.output
    for command in ("info", "verify"):
        result = run(command, tmp_path / "busy")
        assert result.exit_code == 1 and "is not a softcache store (no manifest.json)" in result.output
    result = run("convert", tmp_path / "nowhere", tmp_path / "dest", "--format", "arrow")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert run(*base_args, "--out", tmp_path / "s", "--format", "parquet").exit_code == 2  # click's own usage error


def test_sampled_store_from_the_command_line(base_args, tmp_path):
    store = tmp_path / "sampled"
    result = run(*base_args, "--out", store, "--targets", "sampled", "--samples", 20, "--seed", 5)
    assert result.exit_code == 0, result.output
    words = " ".join(run("info", store).output.split())
    assert "20 systematic sampled draws (unique ids with counts, seed 5)" in words and "values counts" in words
    again = run(*base_args, "--out", store, "--targets", "sampled", "--samples", 20, "--seed", 6)
    assert again.exit_code == 1 and "targets.seed: store has 5, this run 6" in again.output
    other = run(*base_args, "--out", store, "--targets", "sampled", "--samples", 20, "--seed", 5, "--draws", "independent")
    assert other.exit_code == 1 and "targets.draws" in other.output and len(other.output.splitlines()) == 1


def test_python_dash_m_and_debug_traceback(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "softcache", "cache", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--teacher" in ok.stdout and "resumes" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "softcache", "info", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    debug = subprocess.run([sys.executable, "-m", "softcache", "--debug", "info", str(tmp_path)],
                           capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.parametrize("args,message", [
    (["train", "--seed", "1.5"], "Invalid value for '--seed': '1.5' is not a valid integer. (softcache train --help"),
    (["cache", "--format", "parquet"], "Invalid value for '--format'"),
    (["train", "--lrr", "0.1"], "No such option '--lrr'. (Did you mean one of: '--lora-r', '--lr'?)"),
    (["info"], "Missing argument 'STORE'"),
    (["verify", "a", "b"], "Got unexpected extra argument (b)"),
])
def test_a_usage_error_is_one_line_with_exit_status_2(args, message):
    result = run(*args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0] and "Traceback" not in result.output
