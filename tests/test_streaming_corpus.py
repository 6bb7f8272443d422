"""--streaming: --data's dataset files read through datasets' streaming mode give the rows, the
shards and the stores of the memory-mapped reading, with no Arrow copy in datasets' cache, and
resume from the stream's state.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softcache.corpus import python_docs, read_rows
from softcache.corpus_documents import Recipe, pack_rows
from softcache.corpus_stream import CorpusIndex, StreamedCorpus, index_corpus
from softcache.errors import SoftcacheError

from conftest import chatml_tokenizer, put_in_hub_cache, store_files, train_tokenizer, write_conversations


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache under ``tmp_path``, empty, so what a reading writes there can be seen."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path / "datasets-cache"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory of JSON lines (with empty rows), CSV, Parquet (several row groups) and a .txt file."""
    root = tmp_path_factory.mktemp("files")
    paragraphs = [p for topic in python_docs()[:40] for p in topic.split("\n\n")]
    rows = [{"text": t} for t in paragraphs[:250]]
    rows[4]["text"] = rows[90]["text"] = ""
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(root / "b.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([t[:200]] for t in paragraphs[250:330])
    pq.write_table(pa.table({"text": paragraphs[330:700]}), root / "c.parquet", row_group_size=64)
    (root / "d.txt").write_text(python_docs()[5])
    return root


def test_streamed_rows_are_the_memory_mapped_rows(files, datasets_cache):
    streamed = read_rows(str(files), streaming=True)
    assert list(streamed) == list(read_rows(str(files)))
    assert streamed.total() is None and [part.streamed for part in streamed.parts] == [True, True, True, False]
    places = [place for place, _, _, _ in streamed.positioned()]
    for at in (3, 140, 251, 400, len(places) - 2):  # from the stream's state, mid-file and mid-row-group
        again = [value for _, _, _, value in streamed.positioned(json.loads(json.dumps(places[at])))]
        assert again == [value for _, _, _, value in streamed.positioned()][at:]


def test_streaming_writes_no_arrow_copy(files, datasets_cache):
    list(read_rows(str(files), streaming=True))
    assert not list(datasets_cache.rglob("*.arrow"))
    list(read_rows(str(files)))
    assert [p for p in datasets_cache.rglob("*.arrow")]  # the memory-mapped reading makes one: the check can fail


# The stream case reads every document of the streamed corpus to its end: 35 s here, so in the slow suite;
# the documents case (and tests/test_corpus_stream.py for stream packing) stays in the default one.
@pytest.mark.parametrize("packing,seq_len,shard_size", [pytest.param("stream", 64, 3, marks=pytest.mark.slow),
                                                        ("documents", 128, 4)])
def test_streamed_shards_rebuilt_alone_are_the_packed_rows(tokenizer, files, datasets_cache, packing, seq_len,
                                                           shard_size):
    packed = pack_rows(read_rows(str(files)), tokenizer, seq_len, packing=packing)
    rows = read_rows(str(files), streaming=True)
    recipe = Recipe.resolve(rows.shape, packing=packing)
    index = CorpusIndex.from_dict(json.loads(json.dumps(index_corpus(rows, tokenizer, seq_len, shard_size,
                                                                      recipe).to_dict())))
    streamed = StreamedCorpus(index, rows, tokenizer, recipe)
    assert streamed.describe() == packed.describe() and streamed.num_sequences == packed.num_sequences
    assert any(len(cursor.place) == 3 for cursor in index.cursors)  # cursors inside streamed files
    for first in range(0, packed.num_sequences, shard_size):
        count = min(shard_size, packed.num_sequences - first)
        for mine, theirs in zip(streamed.shard(first, count), packed.shard(first, count), strict=True):
            assert (mine is None) == (theirs is None)
            if theirs is not None:
                np.testing.assert_array_equal(mine, theirs)


def test_a_streamed_chat_corpus_and_a_streamed_mix(tmp_path, datasets_cache):
    from softcache.mixture import Mixture

    tokenizer = chatml_tokenizer()
    for name, turns in (("short", 1), ("long", 3)):
        write_conversations(tmp_path / f"{name}.jsonl", 80, turns)
    mixture = Mixture([read_rows(str(tmp_path / f"{name}.jsonl"), streaming=streaming)
                       for name, streaming in (("short", True), ("long", False))], [1, 2], "all_exhausted")
    reference = Mixture([read_rows(str(tmp_path / f"{name}.jsonl")) for name in ("short", "long")], [1, 2],
                        "all_exhausted")
    recipe = Recipe.resolve(mixture.shape)
    index = CorpusIndex.from_dict(json.loads(json.dumps(index_corpus(mixture, tokenizer, 96, 3, recipe).to_dict())))
    expected = index_corpus(reference, tokenizer, 96, 3, recipe)
    assert index.digests == expected.digests and index.summary.mix == expected.summary.mix
    streamed = StreamedCorpus(index, mixture, tokenizer, recipe)
    for first in range(0, index.summary.num_sequences, 3):
        streamed.shard(first, min(3, index.summary.num_sequences - first))  # each checked against its digest


def test_a_streaming_job_writes_the_same_store_and_resumes(cache_config, files, tmp_path, monkeypatch,
                                                            datasets_cache):
    from softcache.cache_job import run_cache
    from softcache.store import StoreWriter

    from conftest import interrupted

    options = dict(data=str(files), max_sequences=None, seq_len=64, batch_size=16, shard_size=48)  # ~1,100 rows
    run_cache(cache_config(out=str(tmp_path / "mapped"), **options))
    config = cache_config(out=str(tmp_path / "streamed"), streaming=True, **options)
    interrupted(monkeypatch, StoreWriter, "write_shard", 4, lambda: run_cache(config))
    run_cache(config)
    assert store_files(tmp_path / "streamed") == store_files(tmp_path / "mapped")


def test_a_hub_snapshot_is_streamed_offline(tmp_path, monkeypatch, files, datasets_cache):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(SoftcacheError, match=r"^--data hf:owner/corpus --streaming reads the dataset's files from "
                                             r"the local hub cache .* huggingface-cli download --repo-type dataset "
                                             r"owner/corpus$"):
        read_rows("hf:owner/corpus", streaming=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(files / "a.jsonl", repo / "train.jsonl")
    put_in_hub_cache(tmp_path / "hub-cache", "owner/corpus", repo, repo_type="dataset")
    streamed = read_rows("hf:owner/corpus", streaming=True)
    rows = list(streamed)
    assert streamed.parts[0].streamed and not list(datasets_cache.rglob("*.arrow"))
    assert rows == [(("hf:owner/corpus",) + row[1:]) for row in read_rows(str(files / "a.jsonl"))]


def test_a_saved_index_of_a_streamed_corpus_holds_only_under_the_same_datasets(files, datasets_cache, monkeypatch):
    """A streamed row's place is datasets' own state format: another datasets version reads the corpus again."""
    import datasets

    from softcache.corpus_stream import corpus_key

    streamed, mapped = read_rows(str(files), streaming=True), read_rows(str(files))
    before = corpus_key({}, streamed, "t")
    assert corpus_key({}, read_rows(str(files), streaming=True), "t") == before
    monkeypatch.setattr(datasets, "__version__", "0.0.1")
    assert corpus_key({}, read_rows(str(files), streaming=True), "t") != before
    assert corpus_key({}, read_rows(str(files)), "t") == corpus_key({}, mapped, "t")  # row numbers need no version



def test_overlapping_streamed_readings_leave_datasets_logging_as_it_was(files, datasets_cache):
    """Readings end in any order (a mix's sources, a shard built in a thread): datasets' own log lines stay
    silenced while any is open, and its verbosity is restored once the last one ends."""
    import logging

    import datasets

    before = datasets.logging.get_verbosity()
    first = read_rows(str(files / "a.jsonl"), streaming=True).positioned()
    second = read_rows(str(files / "c.parquet"), streaming=True).positioned()
    next(first), next(second)
    assert datasets.logging.get_verbosity() > logging.CRITICAL
    first.close()  # the first one opened ends first
    assert datasets.logging.get_verbosity() > logging.CRITICAL
    second.close()
    assert datasets.logging.get_verbosity() == before
