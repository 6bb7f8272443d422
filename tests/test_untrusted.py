"""Stores and run directories from someone else: no path leaves its root, no checkpoint runs code."""

from __future__ import annotations

import hashlib
import json
import shutil

import fsspec
import pytest
import torch

from softcache import SoftcacheError, StoreError, open_store
from softcache.train_job import run_train

from softcache.store.manifest import MANIFEST_SEAL, sealed

from conftest import edit_manifest
from test_store import make, write_store
from test_train import train_config, trained_store  # noqa: F401 (fixtures)


@pytest.fixture
def store(tmp_path):
    layout, encoding = make(6, 4, 3, 3)
    write_store(tmp_path / "s", "zarr", layout, encoding)
    return tmp_path / "s"


def _edit_manifest(root, change) -> None:
    edit_manifest(root, change)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "data.zarr/../../outside.bin", "a//b", "./x",
                                 "C:/x", "a\\..\\b", ""])
@pytest.mark.parametrize("table", ["shards", "files"])
def test_a_manifest_path_that_leaves_the_store_is_refused_when_opened(store, bad, table):
    def change(manifest):
        entry = manifest["shards"][1]["files"][0] if table == "shards" else manifest["files"][0]
        entry["path"] = bad

    _edit_manifest(store, change)
    with pytest.raises(StoreError, match="path"):
        open_store(store)


def test_a_progress_record_that_leaves_the_store_is_not_trusted_on_resume(store, tmp_path):
    from softcache.store.manifest import read_progress

    layout, encoding = make(6, 4, 3, 3)
    write_store(tmp_path / "p", "zarr", layout, encoding, finish=False)
    record = tmp_path / "p" / "progress" / "shard-00000.json"
    data = json.loads(record.read_text())
    data["files"][0]["path"] = "../../elsewhere"
    record.write_text(json.dumps(data))
    assert 0 not in read_progress(tmp_path / "p")  # ignored: the shard is written again


def test_a_symbolic_link_out_of_the_store_is_refused(store, tmp_path):
    opened = open_store(store)
    victim = store / opened.shards[0].files[0].path
    outside = tmp_path / "outside.bin"
    outside.write_bytes(victim.read_bytes())  # same bytes: only the link gives it away
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(StoreError, match="outside the store"):
        open_store(store).read(0, 1)
    problems = open_store(store).verify()
    assert len(problems) == 1 and "resolves outside the store" in problems[0]


def test_a_remote_manifest_cannot_make_the_mirror_write_outside_it(store, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    payload = b"not yours"
    for path in sorted(store.rglob("*")):
        if path.is_file():
            fs.pipe(f"/evil/store/{path.relative_to(store)}", path.read_bytes())
    fs.pipe("/evil/outside.txt", payload)
    manifest = json.loads(fs.cat("/evil/store/manifest.json"))
    manifest["files"].append({"path": "tokenizer/../../outside.txt", "bytes": len(payload),
                              "sha256": hashlib.sha256(payload).hexdigest()})
    fs.pipe("/evil/store/manifest.json", json.dumps(sealed(manifest, MANIFEST_SEAL)).encode())
    try:
        with pytest.raises(StoreError, match="path"):
            open_store("memory://evil/store")
        assert not [p for p in (tmp_path / "cache").rglob("outside.txt")]
    finally:
        fs.rm("/evil", recursive=True)


class _Payload:
    """Pickled into a checkpoint: loading it with pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_on_resume(train_config, tmp_path):  # noqa: F811
    run_train(train_config(steps=2, checkpoint_every=1))
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)  # what softcache writes loads safely
    marker = tmp_path / "ran"
    torch.save({**state, "extra": _Payload(marker)}, newest)
    with pytest.raises(SoftcacheError, match="could run code; it is not loaded"):
        run_train(train_config(steps=2, checkpoint_every=1, resume=True))
    assert not marker.exists()
    shutil.rmtree(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("section,key,value", [
    ("layout", "seq_len", "4"), ("layout", "seq_len", 1), ("layout", "shard_size", 0), ("layout", "num_sequences", None),
    ("encoding", "kind", "dense"), ("encoding", "k", 0), ("encoding", "k", 10**9), ("encoding", "values", "counts"),
    ("encoding", "ids", 3), ("targets", "temperature", -1), ("targets", "kind", ["topk"]), ("tokenizer", "vocab_size", "x"),
    ("corpus", "fingerprint", 7), ("teacher", "name", None), ("totals", "content_sha256", 0), ("storage", "format", "hdf5"),
])
def test_a_manifest_field_of_the_wrong_type_or_range_is_one_store_error(store, section, key, value):
    _edit_manifest(store, lambda manifest: manifest[section].__setitem__(key, value))
    with pytest.raises(StoreError, match=rf"manifest.json: {section}"):
        open_store(store)


@pytest.mark.parametrize("where,key,value", [
    (("shards", 0), "count", 0), (("shards", 1), "first", -5), (("shards", 0), "bytes", -1),
    (("shards", 0, "files", 0), "bytes", -3), (("totals",), "sequences", -1), (("tokenizer",), "vocab_size", 0),
    (("targets",), "k", 0),
])
def test_a_count_or_size_below_its_range_is_one_store_error(store, where, key, value):
    def change(manifest):
        section = manifest
        for step in where:
            section = section[step]
        section[key] = value

    _edit_manifest(store, change)
    with pytest.raises(StoreError, match=rf"\.{key} is {value}, less than"):
        open_store(store)


@pytest.mark.parametrize("change,message", [
    (lambda state: state.update(step="2"), "records step '2', not a step count"),
    (lambda state: state.update(step=-1), "records step -1, not a step count"),
    (lambda state: state.pop("optimizer"), "is not a softcache checkpoint"),
    (lambda state: state.update(rng=[1, 2]), "is not a softcache checkpoint"),
])
def test_a_checkpoint_with_wrong_fields_is_one_line(train_config, tmp_path, change, message):  # noqa: F811
    run_train(train_config(steps=2, checkpoint_every=1))
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    change(state)
    torch.save(state, newest)
    with pytest.raises(SoftcacheError, match=message):
        run_train(train_config(steps=2, checkpoint_every=1, resume=True))
