"""Stores at fsspec URLs: written, resumed, read, cached and checked through a local mirror."""

from __future__ import annotations

import inspect

import fsspec
import numpy as np
import pytest

from softcache import StoreError, open_store
from softcache.cache_job import run_cache
from softcache.store import FORMATS, StoreWriter
from softcache.store.files import describe_file
from softcache.store.remote import Remote
from softcache.store.storage import Local, Storage, open_storage

from conftest import interrupted, store_files
from test_store import make, write_store


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "cache"))
    yield
    fsspec.filesystem("memory").rm("/", recursive=True) if fsspec.filesystem("memory").ls("/") else None


def test_a_store_written_to_a_url_reads_like_a_local_one(cache_config, tmp_path):
    local = cache_config(out=str(tmp_path / "local"), targets="sampled", samples=10)
    run_cache(local)
    remote = cache_config(out="memory://bucket/store", targets="sampled", samples=10)
    result = run_cache(remote)
    assert "memory://bucket/store" in result.summary()
    fs = fsspec.filesystem("memory")
    assert fs.exists("/bucket/store/manifest.json") and not fs.exists("/bucket/store/progress")
    a, b = open_store(local.out), open_store("memory://bucket/store")
    assert a.manifest["totals"]["content_sha256"] == b.manifest["totals"]["content_sha256"]
    for name, array in a.read(0, len(a)).items():
        np.testing.assert_array_equal(array, b.read(0, len(b))[name])
    assert (b.tokenizer_path / "tokenizer.json").is_file() and b.verify() == []
    assert run_cache(remote).already_complete


def test_an_interrupted_remote_job_resumes_from_what_was_uploaded(cache_config, tmp_path, monkeypatch):
    reference = cache_config(out=str(tmp_path / "reference"))
    run_cache(reference)
    url = f"file://{tmp_path / 'bucket' / 'store'}"
    interrupted(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(cache_config(out=url)))
    progress = tmp_path / "bucket" / "store" / "progress"
    assert len(list(progress.glob("shard-*.json"))) == 2
    assert (progress / "corpus-index.json").is_file()  # published too: a resume elsewhere need not read the corpus
    with pytest.raises(StoreError, match="incomplete"):
        open_store(url)
    partial = open_store(url, allow_incomplete=True)  # records only; shards come when read
    assert len(partial) == 10 and partial.read(0, 10)["input_ids"].shape == (10, 32)
    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "another-machine"))  # an empty mirror
    result = run_cache(cache_config(out=url))
    assert result.sequences_written == 14  # shards 2, 3, 4: the first two were downloaded, not recomputed
    assert store_files(tmp_path / "bucket" / "store") == store_files(tmp_path / "reference")


def test_reads_are_cached_and_checked(cache_config, tmp_path):
    run_cache(cache_config(out="memory://bucket/cached"))
    store = open_store("memory://bucket/cached")
    first = store.read(0, len(store))
    fs = fsspec.filesystem("memory")
    shard_file = "/bucket/cached/" + store.shards[0].files[-1].path
    original = fs.cat_file(shard_file)
    fs.pipe_file(shard_file, original[:-1] + bytes([original[-1] ^ 1]))  # damage the remote copy
    again = open_store("memory://bucket/cached")  # the mirror already holds an intact copy
    np.testing.assert_array_equal(again.read(0, len(again))["target_ids"], first["target_ids"])
    problems = again.verify()
    assert len(problems) == 1 and "shard 0" in problems[0] and "sha256" in problems[0]
    fresh = open_store("memory://bucket/cached")
    fresh.storage.local = tmp_path / "empty-mirror"  # a reader with nothing cached
    with pytest.raises(StoreError, match="fails its sha256 checksum after download"):
        fresh.read(0, 1)


def test_a_student_trains_from_a_url(cache_config, tmp_path):
    import json

    from softcache.config import TrainConfig
    from softcache.train_job import run_train

    run_cache(cache_config(out="memory://bucket/train"))
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "max_position_embeddings": 64}))
    result = run_train(TrainConfig(store="memory://bucket/train", student=str(student), out=str(tmp_path / "run"),
                                   steps=3, batch_size=4, eval_fraction=0.2, num_workers=0, progress=False))
    assert result.final_eval["tokens"] > 0 and (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def test_local_and_remote_storage_share_one_interface(tmp_path):
    local, remote = open_storage(tmp_path / "store"), open_storage("memory://bucket/interface")
    assert type(local) is Local and type(remote) is Remote
    assert not (tmp_path / "store").exists()  # a local storage creates nothing
    for storage in (local, remote):
        assert isinstance(storage, Storage)
        for name in ("pull_manifest", "pull_state", "fetch", "reading", "upload", "remove"):
            assert inspect.signature(getattr(type(storage), name)) == inspect.signature(getattr(Storage, name)), name
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a.bin").write_bytes(b"local")
    local.upload("a.bin")
    local.remove("a.bin")
    assert local.fetch("a.bin", describe_file(tmp_path / "store", "a.bin")) == tmp_path / "store" / "a.bin"
    assert (tmp_path / "store" / "a.bin").read_bytes() == b"local"  # a local store is its own copy
    (remote.local / "a.bin").write_bytes(b"first")
    remote.upload("a.bin")
    (remote.local / "a.bin").write_bytes(b"second")
    remote.upload("a.bin", replace=False)
    assert fsspec.filesystem("memory").cat_file("/bucket/interface/a.bin") == b"first"
    remote.remove("a.bin")
    with pytest.raises(StoreError, match="a.bin is missing"):
        remote.fetch("a.bin")


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_a_store_written_through_a_url_has_the_local_bytes_and_rows(tmp_path, format_name):
    layout, encoding = make(10, 4, 3, 3, ids="delta")
    rows = np.random.default_rng(0).integers(0, 10, 16)
    for name, finish, shards in (("whole", True, None), ("part", False, [0, 2])):
        write_store(tmp_path / name, format_name, layout, encoding, finish=finish, shards=shards)
        write_store(f"memory://bucket/{name}", format_name, layout, encoding, finish=finish, shards=shards)
        fs = fsspec.filesystem("memory")
        published = {path[len(f"/bucket/{name}/"):]: fs.cat_file(path) for path in fs.find(f"/bucket/{name}")}
        local = {str(p.relative_to(tmp_path / name)): p.read_bytes() for p in (tmp_path / name).rglob("*")
                 if p.is_file() and p.name != "writer.lock"}  # the lock guards the mirror; it is not published
        assert published == local and "manifest.json" in local and "tokenizer/tokenizer.json" in local
        a = open_store(tmp_path / name, allow_incomplete=True)
        b = open_store(f"memory://bucket/{name}", allow_incomplete=True)
        assert a.shards == b.shards
        for column, array in a.read_rows(rows % len(a)).items():
            np.testing.assert_array_equal(array, b.read_rows(rows % len(b))[column])


def test_a_remote_writer_publishes_files_then_their_record_then_the_manifest(tmp_path, monkeypatch):
    calls = []
    upload, remove = Remote.upload, Remote.remove
    monkeypatch.setattr(Remote, "upload", lambda self, relative, replace=True: (
        calls.append(("upload", relative, replace)), upload(self, relative, replace)))
    monkeypatch.setattr(Remote, "remove", lambda self, relative: (calls.append(("remove", relative)),
                                                                  remove(self, relative)))
    layout, encoding = make(5, 4, 3, 2)
    write_store("memory://bucket/ordered", "arrow", layout, encoding)
    assert calls[0] == ("upload", "manifest.json", False)  # a new store's first manifest
    assert calls[1] == ("upload", "tokenizer/tokenizer.json", True)
    shard_calls = [(name, relative) for name, relative, *_ in calls[2:-2]]
    assert shard_calls == [("upload", relative) for index in range(3) for relative in
                           (f"shards/shard-0000{index}.arrow", f"progress/shard-0000{index}.json")]
    assert calls[-2:] == [("upload", "manifest.json", True), ("remove", "progress")]
