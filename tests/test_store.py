"""Roundtrip, integrity and identity checks of the store formats, on synthetic arrays."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from softcache import StoreError, open_store
from softcache.store import FORMATS, Encoding, Layout, StoreWriter, id_dtype_for
from softcache.store.convert import convert_store
from softcache.store.encoding import ID_CODES, Ragged, encode
from softcache.store.manifest import RECORD_SEAL, ShardRecord, sealed
from softcache.store.registry import storage_section

from conftest import edit_manifest, edit_record


def make(num_sequences: int, seq_len: int, k: int, shard_size: int, vocab: int = 500, **codes):
    """(Layout, Encoding) of a synthetic top-k store."""
    return Layout(num_sequences, seq_len, shard_size), Encoding("topk", k, vocab, **codes)


def header(layout: Layout, encoding: Encoding, format_name: str, teacher: str = "synthetic") -> dict:
    return {
        "storage": storage_section(format_name, layout, encoding),
        "layout": layout.to_dict(),
        "encoding": encoding.to_dict(),
        "targets": {"kind": encoding.kind, "k": encoding.k, "temperature": 1.0},
        "teacher": {"name": teacher},
        "tokenizer": {"fingerprint": "0" * 64, "vocab_size": encoding.vocab_size},
        "corpus": {"source": "synthetic", "fingerprint": "1" * 64},
    }


def random_targets(count: int, seq_len: int, encoding: Encoding, seed: int) -> dict[str, np.ndarray]:
    """Padded decoded-form targets: distinct ids, sorted log-probs that leave a tail, lengths."""
    rng = np.random.default_rng(seed)
    k, vocab = encoding.k, encoding.vocab_size
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(count * seq_len)]).reshape(count, seq_len, k)
    values = np.log(rng.dirichlet(np.ones(k + 1), size=(count, seq_len))[..., :k]).astype(np.float32)
    values = -np.sort(-values, axis=-1)
    lengths = None if encoding.fixed_length else rng.integers(1, k + 1, (count, seq_len))
    if lengths is not None:
        padding = np.arange(k) >= lengths[..., None]
        ids = np.where(padding, ids[..., :1], ids)
        values = np.where(padding, -np.inf, values).astype(np.float32)
    return {"input_ids": rng.integers(0, vocab, (count, seq_len)), "ids": ids, "values": values, "lengths": lengths}


def write_store(root, format_name: str, layout: Layout, encoding: Encoding, finish: bool = True, shards=None,
                teacher_nll: bool = False):
    """Write random shards (with made-up teacher losses when ``teacher_nll``); return the decoded-form
    targets of each shard written."""
    writer = StoreWriter.open(root, header(layout, encoding, format_name))
    writer.save_tokenizer(lambda d: (d.mkdir(), (d / "tokenizer.json").write_text("{}")))
    written = {}
    for index in shards if shards is not None else writer.pending:
        _, count = layout.shard_bounds(index)
        written[index] = random_targets(count, layout.seq_len, encoding, seed=index)
        nll = {"sum": 2.5 * (index + 1), "count": count * layout.seq_len} if teacher_nll else None
        writer.write_shard(index, encode(encoding, **written[index]), teacher_nll=nll)
    if finish:
        writer.finish()
    return written


def joined(written: dict, name: str) -> np.ndarray:
    return np.concatenate([written[i][name] for i in sorted(written)])


@pytest.mark.parametrize("format_name", sorted(FORMATS))
@pytest.mark.parametrize("vocab", [300, 65536, 70000, 140000])
def test_roundtrip(tmp_path, format_name, vocab):
    layout, encoding = make(11, 6, 4, 4, vocab, ids="plain", values="float16")
    written = write_store(tmp_path / "s", format_name, layout, encoding)
    assert encoding.dtype("target_ids") == ("uint16" if vocab <= 65536 else "int32")
    store = open_store(tmp_path / "s")
    assert len(store) == 11 and store.complete
    full = store.read(0, 11)
    assert full["input_ids"].dtype == np.int64 and full["target_ids"].dtype == np.int64
    assert full["target_logprobs"].dtype == np.float32
    np.testing.assert_array_equal(full["target_ids"], joined(written, "ids"))
    np.testing.assert_array_equal(full["input_ids"], joined(written, "input_ids"))
    np.testing.assert_array_equal(full["target_logprobs"], joined(written, "values").astype(np.float16).astype(np.float32))
    # Ranges inside one shard and across shard boundaries; rows in any order, with repeats.
    for start, stop in [(0, 1), (3, 9), (8, 11), (5, 5)]:
        part = store.read(start, stop)
        np.testing.assert_array_equal(part["target_ids"], joined(written, "ids")[start:stop])
    rows = [9, 0, 4, 4, 10, 1]
    np.testing.assert_array_equal(store.read_rows(rows)["target_ids"], joined(written, "ids")[rows])
    with pytest.raises(IndexError):
        store.read(10, 12)
    assert store.verify() == []


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_readers_return_the_columns_written(tmp_path, format_name):
    layout = Layout(5, 4, 5)
    encoding = Encoding("topp", 3, 70000, ids="bitpack", values="log8")
    writer = StoreWriter.open(tmp_path / "s", header(layout, encoding, format_name))
    columns = encode(encoding, **random_targets(5, 4, encoding, seed=0))
    writer.write_shard(0, columns)
    writer.finish()
    read = open_store(tmp_path / "s").shard_columns(0)
    assert list(read) == list(encoding.columns)
    for name, value in columns.items():
        assert isinstance(read[name], Ragged) == isinstance(value, Ragged), name
        for got, want in zip(read[name], value) if isinstance(value, Ragged) else [(read[name], value)]:
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want)


def test_extreme_ids_roundtrip(tmp_path):
    for vocab in (65536, 131073):
        for ids_code in ID_CODES:
            layout, encoding = make(2, 3, 2, 2, vocab, ids=ids_code)
            writer = StoreWriter.open(tmp_path / f"{vocab}-{ids_code}", header(layout, encoding, "zarr"))
            targets = random_targets(2, 3, encoding, seed=0)
            targets["ids"][0, 0] = [0, vocab - 1]
            targets["input_ids"][1, 2] = vocab - 1
            writer.write_shard(0, encode(encoding, **targets))
            writer.finish()
            read = open_store(tmp_path / f"{vocab}-{ids_code}").read(0, 2)
            assert sorted(read["target_ids"][0, 0].tolist()) == [0, vocab - 1]
            assert read["input_ids"][1, 2] == vocab - 1


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_incomplete_store_is_refused_unless_asked(tmp_path, format_name):
    layout, encoding = make(10, 4, 3, 3)
    written = write_store(tmp_path / "s", format_name, layout, encoding, finish=False, shards=[0, 1])
    with pytest.raises(StoreError, match="incomplete.*2 of 4 shards"):
        open_store(tmp_path / "s")
    store = open_store(tmp_path / "s", allow_incomplete=True)
    assert len(store) == 6 and not store.complete
    np.testing.assert_array_equal(store.read(0, 6)["target_ids"][3:], written[1]["ids"])
    assert any("incomplete" in p for p in store.verify())


def test_resume_skips_written_shards_and_rewrites_damaged_ones(tmp_path):
    layout, encoding = make(10, 4, 3, 3)
    write_store(tmp_path / "s", "arrow", layout, encoding, finish=False, shards=[0, 1, 2])
    (tmp_path / "s" / "shards" / "shard-00001.arrow").write_bytes(b"truncated")
    (tmp_path / "s" / "shards" / "shard-00003.arrow.tmp-999").write_bytes(b"left by a crash")
    writer = StoreWriter.open(tmp_path / "s", header(layout, encoding, "arrow"))
    assert writer.pending == [1, 3]
    assert not (tmp_path / "s" / "shards" / "shard-00003.arrow.tmp-999").exists()


def test_remove_temporaries_finds_leftovers_at_any_depth_and_keeps_the_rest(tmp_path):
    from softcache.store.files import remove_temporaries

    kept = ["manifest.json", "data.zarr/shards/00000/target_ids/c/0", "data.zarr/shards/00000/zarr.json",
            "tokenizer/tokenizer.json"]
    leftovers = ["manifest.json.tmp-7", "data.zarr/shards/00001.tmp-7", "data.zarr/shards/00000/target_ids/c/1.partial",
                 "progress/shard-00000.json.tmp-7", "tokenizer.tmp-7"]
    for relative in kept + ["manifest.json.tmp-7", "data.zarr/shards/00000/target_ids/c/1.partial",
                            "progress/shard-00000.json.tmp-7"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    for directory in ("data.zarr/shards/00001.tmp-7/target_ids/c", "tokenizer.tmp-7"):  # half-written directories
        (tmp_path / directory).mkdir(parents=True)
        (tmp_path / directory / "0").write_bytes(b"x")
    removed = remove_temporaries(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted(leftovers)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_zarr_crash_leftovers_never_block_a_rerun(tmp_path):
    layout, encoding = make(10, 4, 3, 3, ids="delta", values="log8")
    written = write_store(tmp_path / "s", "zarr", layout, encoding, finish=False, shards=[0, 1])
    root = tmp_path / "s"
    (root / "data.zarr" / "shards" / "00002.tmp-999" / "target_ids").mkdir(parents=True)  # a half-written shard
    (root / "progress" / "shard-00001.json").unlink()  # shard 1 landed, its record did not
    writer = StoreWriter.open(root, header(layout, encoding, "zarr"))
    assert writer.pending == [1, 2, 3]
    assert not (root / "data.zarr" / "shards" / "00002.tmp-999").exists()
    for index in writer.pending:
        _, count = layout.shard_bounds(index)
        written[index] = random_targets(count, layout.seq_len, encoding, seed=index)
        writer.write_shard(index, encode(encoding, **written[index]))
    writer.finish()
    store = open_store(root)
    assert store.verify() == []
    assert sorted(p.name for p in (root / "data.zarr" / "shards").iterdir()) == ["00000", "00001", "00002", "00003"]


def test_different_identity_is_refused_with_the_differences(tmp_path):
    layout, encoding = make(4, 4, 3, 2)
    write_store(tmp_path / "s", "zarr", layout, encoding)
    _, other = make(4, 4, 5, 2)
    with pytest.raises(StoreError, match=r"different store .*encoding\.k: store has 3, this run 5"):
        StoreWriter.open(tmp_path / "s", header(layout, other, "zarr"))
    with pytest.raises(StoreError, match=r"teacher\.name: store has \"synthetic\", this run \"other\""):
        StoreWriter.open(tmp_path / "s", header(layout, encoding, "zarr", teacher="other"))
    # The same identity on a complete store: nothing left to do.
    assert StoreWriter.open(tmp_path / "s", header(layout, encoding, "zarr")).complete


def test_out_must_be_empty_directory_or_store(tmp_path):
    layout, encoding = make(4, 4, 3, 2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter.open(tmp_path / "file", header(layout, encoding, "zarr"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no softcache store"):
        StoreWriter.open(tmp_path / "busy", header(layout, encoding, "zarr"))


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_verify_names_flipped_byte_and_missing_shard(tmp_path, format_name):
    layout, encoding = make(9, 5, 4, 3)
    write_store(tmp_path / "s", format_name, layout, encoding)
    store = open_store(tmp_path / "s")
    assert store.verify() == []
    flipped = tmp_path / "s" / store.shards[1].files[-1].path
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    (tmp_path / "s" / store.shards[2].files[0].path).unlink()
    (tmp_path / "s" / "tokenizer" / "tokenizer.json").write_text('{"changed": true}')
    problems = store.verify()
    assert len(problems) == 3
    assert problems[0].startswith("shard 1:") and "sha256" in problems[0]
    assert problems[1].startswith("shard 2:") and "missing" in problems[1]
    assert problems[2].startswith("tokenizer/tokenizer.json has")


@pytest.mark.parametrize("source_format,dest_format", [("zarr", "arrow"), ("arrow", "zarr")])
def test_convert_roundtrip(tmp_path, source_format, dest_format):
    layout, encoding = make(7, 5, 4, 3, 100000, ids="bitpack")
    write_store(tmp_path / "a", source_format, layout, encoding)
    convert_store(tmp_path / "a", tmp_path / "b", dest_format)
    convert_store(tmp_path / "b", tmp_path / "c", source_format)
    a, b, c = (open_store(tmp_path / n) for n in "abc")
    assert b.manifest["storage"]["format"] == dest_format
    assert a.manifest["totals"]["content_sha256"] == b.manifest["totals"]["content_sha256"] == c.manifest["totals"]["content_sha256"]
    for name, array in a.read(0, 7).items():
        np.testing.assert_array_equal(array, b.read(0, 7)[name])
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").exists()
    assert b.verify() == [] and c.verify() == []


def test_leaving_the_writer_block_frees_the_lock_also_on_an_error(tmp_path):
    layout, encoding = make(4, 4, 3, 2)
    root = tmp_path / "s"
    with pytest.raises(RuntimeError, match="the teacher crashed"):
        with StoreWriter.open(root, header(layout, encoding, "zarr")) as writer:
            assert (root / "writer.lock").is_file()
            writer.write_shard(0, encode(encoding, **random_targets(2, layout.seq_len, encoding, seed=0)))
            raise RuntimeError("the teacher crashed")
    assert not (root / "writer.lock").exists()
    with StoreWriter.open(root, header(layout, encoding, "zarr")) as writer:
        assert writer.pending == [1]
    assert not (root / "writer.lock").exists()  # left without finishing, and without an error


def test_an_interrupted_conversion_frees_dest_and_resumes(tmp_path):
    layout, encoding = make(7, 5, 4, 3)
    write_store(tmp_path / "a", "zarr", layout, encoding)

    def stop_after_first(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_store(tmp_path / "a", tmp_path / "b", "arrow", on_shard=stop_after_first)
    assert not (tmp_path / "b" / "writer.lock").exists() and (tmp_path / "b" / "progress").is_dir()
    done = []
    convert_store(tmp_path / "a", tmp_path / "b", "arrow", on_shard=done.append)
    assert done == [1, 2] and open_store(tmp_path / "b").verify() == []


def test_manifest_problems_are_one_clear_error(tmp_path):
    layout, encoding = make(4, 4, 3, 2)
    write_store(tmp_path / "s", "zarr", layout, encoding)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99, newer than"):
        open_store(tmp_path / "s")
    manifest_path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(StoreError, match="format version 1, from an older softcache"):
        open_store(tmp_path / "s")
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(StoreError, match="fails its checksum"):
        open_store(tmp_path / "s")
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}))
    with pytest.raises(StoreError, match="has no manifest_sha256"):
        open_store(tmp_path / "s")
    edit_manifest(tmp_path / "s", lambda m: {k: v for k, v in manifest.items() if k != "layout"})
    with pytest.raises(StoreError, match="lacks required fields: layout"):
        open_store(tmp_path / "s")
    manifest_path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nowhere")


@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_readers_check_a_shard_when_they_first_read_it(tmp_path, format_name):
    layout, encoding = make(9, 5, 4, 3)
    written = write_store(tmp_path / "s", format_name, layout, encoding)
    store = open_store(tmp_path / "s")
    damaged = tmp_path / "s" / store.shards[1].files[-1].path
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    fresh = open_store(tmp_path / "s")
    np.testing.assert_array_equal(fresh.read(0, 3)["target_ids"], written[0]["ids"])  # shard 0 is intact
    with pytest.raises(StoreError, match=r"shard 1 \(.*\) fails its sha256 checksum; the store is damaged"):
        fresh.read(3, 6)
    trusting = open_store(tmp_path / "s", verify_checksums=False)  # a trusted disk: no hashing
    try:
        trusting.read(3, 6)
    except Exception as err:  # the damaged bytes may still fail to decode; never silently as a checksum error
        assert not isinstance(err, StoreError) or "sha256" not in str(err)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    layout, encoding = make(4, 4, 3, 2)
    root = tmp_path / "s"
    write_store(root, "zarr", layout, encoding, finish=False, shards=[0])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (root / "writer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                      "since": "2026-11-29 01:00:00"}))
        with pytest.raises(StoreError, match=rf"being written by another teacher job \(this host, pid {other.pid}"):
            StoreWriter.open(root, header(layout, encoding, "zarr"))
    finally:
        other.kill()
        other.wait()
    writer = StoreWriter.open(root, header(layout, encoding, "zarr"))  # its job is dead: taken over
    assert json.loads((root / "writer.lock").read_text())["pid"] != other.pid
    (root / "writer.lock").write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "since": "x"}))
    with pytest.raises(StoreError, match=r"host gpu-node-7, pid 1.*if that job is gone, remove"):
        StoreWriter.open(root, header(layout, encoding, "zarr"))
    (root / "writer.lock").unlink()
    writer = StoreWriter.open(root, header(layout, encoding, "zarr"))
    _, count = layout.shard_bounds(1)
    writer.write_shard(1, encode(encoding, **random_targets(count, layout.seq_len, encoding, seed=1)))
    writer.finish()
    assert not (root / "writer.lock").exists()  # released with the finished store


def test_shard_records_write_back_key_for_key(tmp_path):
    layout, encoding = make(5, 4, 3, 3)
    root = tmp_path / "s"
    with StoreWriter.open(root, header(layout, encoding, "zarr")) as writer:
        for index, nll in ((0, {"sum": 12.25, "count": 11}), (1, None)):
            _, count = layout.shard_bounds(index)
            record = writer.write_shard(index, encode(encoding, **random_targets(count, 4, encoding, index)), nll)
            text = (root / "progress" / f"shard-0000{index}.json").read_text()
            parsed = ShardRecord.from_dict(json.loads(text))
            assert parsed == record
            assert json.dumps(sealed(parsed.to_dict(), RECORD_SEAL), indent=2) + "\n" == text
            assert list(parsed.to_dict()) == ["index", "first", "count", "bytes", "content_sha256", "files"] + (
                ["teacher_nll"] if nll else [])
            assert [list(f) for f in parsed.to_dict()["files"]] == [["path", "bytes", "sha256"]] * len(record.files)
        writer.finish()
    store = open_store(root)
    assert store.shards == list(writer.done.values()) and store.shards[0].teacher_nll == {"sum": 12.25, "count": 11}
    table = json.loads((root / "manifest.json").read_text())["shards"]
    assert json.dumps([s.to_dict() for s in store.shards]) == json.dumps(table)


def test_a_malformed_progress_record_is_ignored_and_its_shard_rewritten(tmp_path):
    layout, encoding = make(10, 4, 3, 3)
    write_store(tmp_path / "s", "arrow", layout, encoding, finish=False, shards=[0, 1, 2])
    for index, change in ((1, {"count": "3"}), (2, {"files": {"path": "shards/shard-00002.arrow"}})):
        path = tmp_path / "s" / "progress" / f"shard-0000{index}.json"
        edit_record(path, lambda record: {**record, **change})
    assert [s.index for s in open_store(tmp_path / "s", allow_incomplete=True).shards] == [0]
    assert StoreWriter.open(tmp_path / "s", header(layout, encoding, "arrow")).pending == [1, 2, 3]


@pytest.mark.parametrize("key,damage,message", [
    ("shards", lambda shards: [shards[0], {**shards[1], "count": "3"}], r"shards\[1\]\.count is \"3\", not int"),
    ("shards", lambda shards: [{**shards[0], "files": [{"path": "x", "bytes": 1}]}],
     r"shards\[0\]\.files\[0\] lacks the field 'sha256'"),
    ("shards", lambda shards: {"0": shards[0]}, r"shards is \{.*, not a list"),
    ("files", lambda files: [{**files[0], "bytes": None}], r"files\[0\]\.bytes is null, not int"),
])
def test_a_damaged_table_in_a_complete_manifest_is_a_store_error_naming_it(tmp_path, key, damage, message):
    layout, encoding = make(4, 4, 3, 2)
    write_store(tmp_path / "s", "zarr", layout, encoding)
    path = tmp_path / "s" / "manifest.json"
    edit_manifest(tmp_path / "s", lambda manifest: {**manifest, key: damage(manifest[key])})
    expected = rf"{re.escape(str(path))}: {message}; the store's manifest is damaged"
    with pytest.raises(StoreError, match=expected):
        open_store(tmp_path / "s")
    if key == "shards":  # a writer reopening the complete store reads its shard table too
        with pytest.raises(StoreError, match=expected):
            StoreWriter.open(tmp_path / "s", header(layout, encoding, "zarr"))
