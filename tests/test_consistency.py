"""A store's metadata is checked against itself and against its bytes, not only its checksums.

Each test makes one kind of damage that every checksum would pass (the manifest or record is
resealed after the edit, as someone editing it on purpose would), or damages shard bytes with
checksums off, and asserts that opening, reading, verifying, resuming or converting catches it.
The fuzzers at the end damage manifests and shard bytes at random: 60 examples each by default,
more with ``SOFTCACHE_FUZZ_EXAMPLES=2000`` (a soak run, outside the default suite's time)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softcache import StoreError, open_store
from softcache.store import StoreWriter
from softcache.store.arrow_format import ArrowFormat
from softcache.store.convert import convert_store
from softcache.store.encoding import Encoding
from softcache.store.manifest import MANIFEST_SEAL, sealed
from softcache.store.reader import Store

from conftest import edit_manifest, edit_record, with_digest_everywhere, with_shard
from test_store import header, make, write_store


@pytest.fixture
def store(tmp_path):
    layout, encoding = make(9, 4, 3, 3)
    write_store(tmp_path / "s", "zarr", layout, encoding)
    return tmp_path / "s"


def _problems(root) -> list[str]:
    """What ``softcache verify`` reports (it opens an inconsistent store to list every problem)."""
    return Store(root, allow_incomplete=True, refuse_inconsistent=False).verify()


TABLE_DAMAGE = [
    ("a shard entry removed", lambda m: {**m, "shards": m["shards"][:1] + m["shards"][2:]},
     "lists 2 shards for a layout of 3 (missing: 1)"),
    ("shards out of order", lambda m: {**m, "shards": [m["shards"][1], m["shards"][0], m["shards"][2]]},
     "out of order or repeated"),
    ("a shard's first sequence moved", lambda m: with_shard(m, 1, first=2), "shard 1 claims sequences 2..4"),
    ("a shard's count changed", lambda m: with_shard(m, 2, count=2), "shard 2 claims sequences 6..7"),
    ("a shard's size changed", lambda m: with_shard(m, 0, bytes=1), "shard 0 records 1 bytes"),
    ("a shard's files emptied", lambda m: with_shard(m, 0, files=[], bytes=0), "shard 0 lists no files"),
    ("a shard listing another's file", lambda m: with_shard(m, 0, files=m["shards"][1]["files"],
                                                        bytes=m["shards"][1]["bytes"]), "which is not one of its files"),
    ("the sequence total changed", lambda m: {**m, "totals": {**m["totals"], "sequences": 8}},
     "totals.sequences is 8"),
    ("the byte total changed", lambda m: {**m, "totals": {**m["totals"], "data_bytes": 5}}, "totals.data_bytes is 5"),
    ("a shard's content digest edited", lambda m: with_shard(m, 1, content_sha256="ab" * 32),
     "totals.content_sha256"),
    ("a tokenizer file outside tokenizer/", lambda m: {**m, "files": [{**m["files"][0], "path": "data.zarr/x"}]},
     "outside tokenizer/"),
]


@pytest.mark.parametrize("name,damage,message", TABLE_DAMAGE, ids=[d[0] for d in TABLE_DAMAGE])
def test_a_shard_table_that_does_not_add_up_is_refused_when_opened_and_listed_by_verify(store, name, damage, message):
    edit_manifest(store, damage)
    with pytest.raises(StoreError, match="the store's metadata is inconsistent") as caught:
        open_store(store)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert any(message in problem for problem in _problems(store))


def test_a_content_digest_edited_everywhere_is_caught_when_the_shard_is_read(store):
    edit_manifest(store, lambda m: with_digest_everywhere(m, 1))
    opened = open_store(store)  # the table adds up now
    opened.read(0, 3)
    with pytest.raises(StoreError, match="shard 1 holds columns whose content digest differs"):
        opened.read(3, 6)
    assert _problems(store) == ["shard 1: its columns' content digest differs from its record's"]


def test_a_flipped_byte_in_the_manifest_is_caught_by_its_seal(store):
    path = store / "manifest.json"
    text = path.read_text()
    at = text.index('"num_sequences": ') + len('"num_sequences": ')
    path.write_text(text[:at] + str(int(text[at]) ^ 1) + text[at + 1:])  # 9 -> 8: still valid JSON
    with pytest.raises(StoreError, match="fails its checksum"):
        open_store(store)


def test_verify_names_a_data_file_that_no_record_lists(store):
    extra = store / "data.zarr" / "shards" / "00007"
    extra.mkdir()
    (extra / "zarr.json").write_text("{}")
    assert _problems(store) == ["data.zarr/shards/00007/zarr.json is in the store but no record lists it"]


@pytest.mark.parametrize("forge", ["no files", "another shard's files", "a wrong content digest", "bounds"])
def test_a_forged_progress_record_is_not_trusted_by_a_resumed_writer(tmp_path, forge):
    layout, encoding = make(9, 4, 3, 3)
    write_store(tmp_path / "s", "arrow", layout, encoding, finish=False, shards=[0, 1])
    progress = tmp_path / "s" / "progress"
    zero = json.loads((progress / "shard-00000.json").read_text())
    forged = {"no files": {**zero, "index": 2, "first": 6, "files": [], "bytes": 0},
              "another shard's files": {**zero, "index": 2, "first": 6},
              "a wrong content digest": None,
              "bounds": {**zero, "index": 2, "first": 6, "count": 2}}[forge]
    if forged is None:  # shard 1's own record, claiming shard 0's content
        edit_record(progress / "shard-00001.json", lambda r: {**r, "content_sha256": zero["content_sha256"]})
    else:
        (progress / "shard-00002.json").write_text(json.dumps(sealed(forged, "record_sha256")))
    writer = StoreWriter.open(tmp_path / "s", header(layout, encoding, "arrow"))
    assert writer.pending == ([1, 2] if forged is None else [2])
    writer.release_lock()


def test_an_unsealed_or_misfiled_progress_record_is_ignored(tmp_path):
    layout, encoding = make(9, 4, 3, 3)
    write_store(tmp_path / "s", "zarr", layout, encoding, finish=False, shards=[0, 1])
    progress = tmp_path / "s" / "progress"
    record = json.loads((progress / "shard-00001.json").read_text())
    (progress / "shard-00001.json").write_text(json.dumps({**record, "record_sha256": "0" * 64}))
    shutil.copy(progress / "shard-00000.json", progress / "shard-00002.json")
    assert [s.index for s in open_store(tmp_path / "s", allow_incomplete=True).shards] == [0]


def test_a_writer_does_not_mark_a_store_complete_when_its_table_does_not_add_up(tmp_path):
    layout, encoding = make(9, 4, 3, 3)
    write_store(tmp_path / "s", "zarr", layout, encoding, finish=False)
    writer = StoreWriter.open(tmp_path / "s", header(layout, encoding, "zarr"))
    assert writer.pending == []
    writer.done[1] = dataclasses.replace(writer.done[1], bytes=writer.done[1].bytes + 1)
    with pytest.raises(StoreError, match="was not marked complete: shard 1 records"):
        writer.finish()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["complete"] is False
    writer.release_lock()


def test_convert_that_changes_content_leaves_dest_incomplete(store, tmp_path, monkeypatch):
    original = ArrowFormat.write_shard

    def lossy(self, root, layout, encoding, index, columns):
        if index == 1:
            columns = {**columns, "input_ids": columns["input_ids"] ^ 1}
        return original(self, root, layout, encoding, index, columns)

    monkeypatch.setattr(ArrowFormat, "write_shard", lossy)
    with pytest.raises(StoreError, match="changed the content of shard 1; DEST is left incomplete"):
        convert_store(store, tmp_path / "dest", "arrow")
    assert json.loads((tmp_path / "dest" / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr(ArrowFormat, "write_shard", original)
    convert_store(store, tmp_path / "dest", "arrow")  # the rerun rewrites shard 1 (its record is not trusted)
    assert open_store(tmp_path / "dest").verify() == []


# ---- shard bytes that would size an allocation, read with checksums off -----------------------------

def _zarr_array_meta(store, shard: int, array: str):
    return store / "data.zarr" / "shards" / f"{shard:05d}" / array / "zarr.json"


@pytest.mark.parametrize("array,shape", [("target_ids", [4_000_000_000]), ("input_ids", [3, 400_000_000]),
                                         ("target_values_offsets", [2_000_000_000])])
def test_a_zarr_shape_from_damaged_metadata_is_refused_before_reading(store, array, shape):
    path = _zarr_array_meta(store, 1, array)
    meta = json.loads(path.read_text())
    meta["shape"] = shape
    path.write_text(json.dumps(meta))
    opened = open_store(store, verify_checksums=False)
    with pytest.raises(StoreError, match=rf"shard 1 declares {array} as .*cannot hold"):
        opened.read(3, 6)


def _topp_store(tmp_path, format_name: str):
    layout = make(6, 5, 4, 3)[0]
    encoding = Encoding("topp", 4, 300, ids="bitpack")
    write_store(tmp_path / format_name, format_name, layout, encoding)
    return tmp_path / format_name


@pytest.mark.parametrize("array,damage,message", [
    ("target_lengths", lambda a: np.full_like(a, 200), "target_lengths outside 1..4"),
    ("target_values_offsets", lambda a: a * 1000, "target_values offsets that disagree"),
    ("target_ids_offsets", lambda a: a[:2], "target_ids offsets of shape"),
    ("input_ids", lambda a: a + 299, "input ids outside the vocabulary of 300"),
    ("target_ids", lambda a: np.full_like(a, 255), "decodes to target ids outside the vocabulary of 300"),
    ("target_values", lambda a: np.full_like(a, np.nan), "decodes to NaN log-probabilities"),
])
def test_damaged_lengths_and_offsets_are_refused_before_decoding(tmp_path, monkeypatch, array, damage, message):
    """Arrays that pass their metadata's shape check but hold damaged values (checksums off): the
    reader's load refuses them, so nothing is decoded or sized from them."""
    from softcache.store.zarr_format import ZarrReader

    read = ZarrReader._read
    monkeypatch.setattr(ZarrReader, "_read", lambda self, group, name, *rest: (
        damage(read(self, group, name, *rest)) if name == array else read(self, group, name, *rest)))
    opened = open_store(_topp_store(tmp_path, "zarr"), verify_checksums=False)
    with pytest.raises(StoreError, match=message):
        opened.read(0, 3)


# ---- the fuzzer --------------------------------------------------------------------------------------

FIELDS = [(("layout",), "num_sequences"), (("layout",), "seq_len"), (("layout",), "shard_size"),
          (("encoding",), "k"), (("encoding",), "kind"), (("encoding",), "vocab_size"), (("encoding",), "ids"),
          (("encoding",), "values"), (("storage",), "format"), (("storage",), "codec"), (("targets",), "kind"),
          (("targets",), "temperature"), (("targets",), "k"), (("tokenizer",), "vocab_size"),
          (("tokenizer",), "fingerprint"), (("corpus",), "fingerprint"), (("teacher",), "name"),
          (("totals",), "sequences"), (("totals",), "tokens"), (("totals",), "data_bytes"),
          (("totals",), "content_sha256"), (("totals",), "bytes_per_token"), (("shards", 0), None),
          (("shards", 2), None), (("shards", 1, "files", 0), None),
          (("shards", 1, "teacher_nll"), None), (("totals",), "teacher_ce"), (("files", 0), None), ((), "complete"),
          ((), "format_version"), ((), "shards"), ((), "files"), ((), "totals"), ((), "layout")]
"""(where the field is, from the manifest's top; its key, or None: any key there, drawn)."""
FUZZ_EXAMPLES = os.environ.get("SOFTCACHE_FUZZ_EXAMPLES", "60")
if not FUZZ_EXAMPLES.isdigit() or int(FUZZ_EXAMPLES) < 1:
    raise pytest.UsageError(f"SOFTCACHE_FUZZ_EXAMPLES must be a positive integer, got {FUZZ_EXAMPLES!r}")
FUZZ_EXAMPLES = int(FUZZ_EXAMPLES)
WRONG = [None, "x", -1, 0, 10**12, 1.5, float("inf"), [], {}, True]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    layout = make(9, 4, 3, 3)[0]
    for name, format_name, encoding in (("zarr", "zarr", Encoding("topp", 3, 300, ids="delta")),
                                        ("arrow", "arrow", Encoding("topk", 3, 300)),
                                        ("ranked", "arrow", Encoding("topp", 3, 300, ids="ranked"))):
        write_store(root / name, format_name, layout, encoding, teacher_nll=True)
    return root


def _one_line_or_clean(call) -> None:
    """``call()`` either works or raises one StoreError line: never another exception."""
    try:
        call()
    except StoreError as err:
        assert "\n" not in str(err) and str(err)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(format_name=st.sampled_from(["zarr", "arrow"]), field=st.sampled_from(FIELDS),
       how=st.sampled_from(["remove", "wrong"]), wrong=st.sampled_from(WRONG), entry_key=st.integers(0, 99),
       seal=st.booleans())
def test_fuzz_manifest_fields(pristine, tmp_path_factory, format_name, field, how, wrong, entry_key, seal):
    """Every field (a key of a section, of a shard record or of a tokenizer file entry, or a whole
    section) removed or given a wrong value, with or without a fresh seal: opening and reading work
    or raise one StoreError line, and ``info``/``verify`` print only ``error:`` lines."""
    root = tmp_path_factory.mktemp("fuzz") / "s"
    shutil.copytree(pristine / format_name, root)
    manifest = json.loads((root / "manifest.json").read_text())
    where, key = field
    target = manifest
    for step in where:
        target = target[step]
    key = key or sorted(target)[entry_key % len(target)]
    if how == "remove":
        target.pop(key, None)
    else:
        target[key] = wrong
    (root / "manifest.json").write_text(json.dumps(sealed(manifest, MANIFEST_SEAL) if seal else manifest))

    def open_and_read():
        store = open_store(root)
        problems = store.verify()
        assert all(problem and "\n" not in problem for problem in problems)
        if problems:  # a record edited to disagree with its file: reading may refuse it, in one line
            _one_line_or_clean(lambda: store.read(0, len(store)))
        else:
            store.read(0, len(store))

    _one_line_or_clean(open_and_read)
    from click.testing import CliRunner

    from softcache.cli import main
    for command in (["info", str(root)], ["verify", str(root)]):
        result = CliRunner().invoke(main, command)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
        assert result.exit_code == 0 or all(line.startswith("error: ") for line in lines), result.output


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(format_name=st.sampled_from(["zarr", "arrow", "ranked"]), pick=st.integers(0, 10**6), offset=st.integers(0, 10**9),
       bit=st.integers(0, 7), checksums=st.booleans())
def test_fuzz_shard_bytes(pristine, tmp_path_factory, format_name, pick, offset, bit, checksums):
    root = tmp_path_factory.mktemp("fuzz") / "s"
    shutil.copytree(pristine / format_name, root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ("data.zarr" in p.parts or "shards" in p.parts))
    path = files[pick % len(files)]
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))
    store = open_store(root, verify_checksums=checksums)
    problems = store.verify()
    assert problems and all("\n" not in p for p in problems)  # every flipped bit is a file that fails its sha256
    if checksums:
        with pytest.raises(StoreError):
            store.read(0, len(store))
    else:  # trusted disk: the damage may go unseen, but it is never a crash or a huge allocation
        _one_line_or_clean(lambda: store.read(0, len(store)))
