"""Roundtrip, integrity and identity checks of the store formats, on synthetic arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softcache import StoreError, open_store
from softcache.store import FORMATS, Layout, StoreWriter, id_dtype_for
from softcache.store.convert import convert_store
from softcache.store.registry import storage_section


def header(layout: Layout, format_name: str, teacher: str = "synthetic") -> dict:
    return {
        "storage": storage_section(format_name, layout),
        "layout": layout.to_dict(),
        "targets": {"kind": "topk", "k": layout.k, "temperature": 1.0},
        "teacher": {"name": teacher},
        "tokenizer": {"fingerprint": "0" * 64, "vocab_size": 70000},
        "corpus": {"source": "synthetic", "fingerprint": "1" * 64},
    }


def random_shard(layout: Layout, index: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed * 1000 + index)
    _, count = layout.shard_bounds(index)
    logits = rng.normal(size=(count, layout.seq_len, layout.k)).astype(np.float32)
    values = -np.sort(np.abs(logits), axis=-1)
    return {
        "input_ids": rng.integers(0, vocab, (count, layout.seq_len)).astype(layout.id_dtype),
        "target_ids": rng.integers(0, vocab, (count, layout.seq_len, layout.k)).astype(layout.id_dtype),
        "target_logprobs": values.astype(np.float16),
    }


def write_store(root, format_name: str, layout: Layout, vocab: int, finish: bool = True, shards=None):
    writer = StoreWriter.open(root, header(layout, format_name))
    writer.save_tokenizer(lambda d: (d.mkdir(), (d / "tokenizer.json").write_text("{}")))
    written = {}
    for index in shards if shards is not None else writer.pending:
        written[index] = random_shard(layout, index, vocab)
        writer.write_shard(index, written[index])
    if finish:
        writer.finish()
    return written


@pytest.mark.parametrize("format_name", sorted(FORMATS))
@pytest.mark.parametrize("vocab", [300, 65536, 70000, 140000])
def test_roundtrip(tmp_path, format_name, vocab):
    layout = Layout(num_sequences=11, seq_len=6, k=4, shard_size=4, id_dtype=id_dtype_for(vocab))
    written = write_store(tmp_path / "s", format_name, layout, vocab)
    expected = {name: np.concatenate([written[i][name] for i in range(layout.num_shards)]) for name in written[0]}
    # Ids at the ends of the vocabulary survive.
    assert layout.id_dtype == ("uint16" if vocab <= 65536 else "int32")
    store = open_store(tmp_path / "s")
    assert len(store) == 11 and store.complete
    full = store.read(0, 11)
    assert full["input_ids"].dtype == np.int64 and full["target_ids"].dtype == np.int64
    assert full["target_logprobs"].dtype == np.float32
    np.testing.assert_array_equal(full["target_ids"], expected["target_ids"])
    np.testing.assert_array_equal(full["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(full["target_logprobs"], expected["target_logprobs"].astype(np.float32))
    # Ranges inside one shard and across shard boundaries.
    for start, stop in [(0, 1), (3, 9), (8, 11), (5, 5)]:
        part = store.read(start, stop)
        np.testing.assert_array_equal(part["target_ids"], expected["target_ids"][start:stop])
    with pytest.raises(IndexError):
        store.read(10, 12)
    assert store.verify() == []


def test_extreme_ids_roundtrip(tmp_path):
    for vocab in (65536, 131073):
        layout = Layout(num_sequences=2, seq_len=3, k=2, shard_size=2, id_dtype=id_dtype_for(vocab))
        writer = StoreWriter.open(tmp_path / str(vocab), header(layout, "zarr"))
        arrays = layout.empty_shard(2)
        arrays["target_ids"][0, 0] = [0, vocab - 1]
        arrays["input_ids"][1, 2] = vocab - 1
        writer.write_shard(0, arrays)
        writer.finish()
        read = open_store(tmp_path / str(vocab)).read(0, 2)
        assert read["target_ids"][0, 0].tolist() == [0, vocab - 1]
        assert read["input_ids"][1, 2] == vocab - 1


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_incomplete_store_is_refused_unless_asked(tmp_path, format_name):
    layout = Layout(num_sequences=10, seq_len=4, k=3, shard_size=3, id_dtype="uint16")
    written = write_store(tmp_path / "s", format_name, layout, 500, finish=False, shards=[0, 1])
    with pytest.raises(StoreError, match="incomplete.*2 of 4 shards"):
        open_store(tmp_path / "s")
    store = open_store(tmp_path / "s", allow_incomplete=True)
    assert len(store) == 6 and not store.complete
    np.testing.assert_array_equal(store.read(0, 6)["target_ids"][3:], written[1]["target_ids"])
    assert any("incomplete" in p for p in store.verify())


def test_resume_skips_written_shards_and_rewrites_damaged_ones(tmp_path):
    layout = Layout(num_sequences=10, seq_len=4, k=3, shard_size=3, id_dtype="uint16")
    write_store(tmp_path / "s", "arrow", layout, 500, finish=False, shards=[0, 1, 2])
    (tmp_path / "s" / "shards" / "shard-00001.arrow").write_bytes(b"truncated")
    (tmp_path / "s" / "shards" / "shard-00003.arrow.tmp-999").write_bytes(b"left by a crash")
    writer = StoreWriter.open(tmp_path / "s", header(layout, "arrow"))
    assert writer.pending == [1, 3]
    assert not (tmp_path / "s" / "shards" / "shard-00003.arrow.tmp-999").exists()


def test_different_identity_is_refused_with_the_differences(tmp_path):
    layout = Layout(num_sequences=4, seq_len=4, k=3, shard_size=2, id_dtype="uint16")
    write_store(tmp_path / "s", "zarr", layout, 500)
    other = Layout(num_sequences=4, seq_len=4, k=5, shard_size=2, id_dtype="uint16")
    with pytest.raises(StoreError, match=r"different store .*layout\.k: store has 3, this run 5"):
        StoreWriter.open(tmp_path / "s", header(other, "zarr"))
    with pytest.raises(StoreError, match=r"teacher\.name: store has \"synthetic\", this run \"other\""):
        StoreWriter.open(tmp_path / "s", header(layout, "zarr", teacher="other"))
    # The same identity on a complete store: nothing left to do.
    assert StoreWriter.open(tmp_path / "s", header(layout, "zarr")).complete


def test_out_must_be_empty_directory_or_store(tmp_path):
    layout = Layout(num_sequences=4, seq_len=4, k=3, shard_size=2, id_dtype="uint16")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter.open(tmp_path / "file", header(layout, "zarr"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no softcache store"):
        StoreWriter.open(tmp_path / "busy", header(layout, "zarr"))


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_verify_names_flipped_byte_and_missing_shard(tmp_path, format_name):
    layout = Layout(num_sequences=9, seq_len=5, k=4, shard_size=3, id_dtype="uint16")
    write_store(tmp_path / "s", format_name, layout, 500)
    store = open_store(tmp_path / "s")
    assert store.verify() == []
    flipped = tmp_path / "s" / store.shards[1]["files"][-1]["path"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    (tmp_path / "s" / store.shards[2]["files"][0]["path"]).unlink()
    (tmp_path / "s" / "tokenizer" / "tokenizer.json").write_text('{"changed": true}')
    problems = store.verify()
    assert len(problems) == 3
    assert problems[0].startswith("shard 1:") and "sha256" in problems[0]
    assert problems[1].startswith("shard 2:") and "missing" in problems[1]
    assert problems[2].startswith("tokenizer/tokenizer.json has")


@pytest.mark.parametrize("source_format,dest_format", [("zarr", "arrow"), ("arrow", "zarr")])
def test_convert_roundtrip(tmp_path, source_format, dest_format):
    layout = Layout(num_sequences=7, seq_len=5, k=4, shard_size=3, id_dtype="int32")
    write_store(tmp_path / "a", source_format, layout, 100000)
    convert_store(tmp_path / "a", tmp_path / "b", dest_format)
    convert_store(tmp_path / "b", tmp_path / "c", source_format)
    a, b, c = (open_store(tmp_path / n) for n in "abc")
    assert b.manifest["storage"]["format"] == dest_format
    assert a.manifest["totals"]["content_sha256"] == b.manifest["totals"]["content_sha256"] == c.manifest["totals"]["content_sha256"]
    for name, array in a.read(0, 7).items():
        np.testing.assert_array_equal(array, b.read(0, 7)[name])
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").exists()
    assert b.verify() == [] and c.verify() == []


def test_manifest_problems_are_one_clear_error(tmp_path):
    layout = Layout(num_sequences=4, seq_len=4, k=3, shard_size=2, id_dtype="uint16")
    write_store(tmp_path / "s", "zarr", layout, 500)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99, newer than"):
        open_store(tmp_path / "s")
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "layout"}))
    with pytest.raises(StoreError, match="lacks required fields: layout"):
        open_store(tmp_path / "s")
    manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nowhere")
