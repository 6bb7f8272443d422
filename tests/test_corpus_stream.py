"""softcache.corpus_stream: the streamed corpus gives, shard by shard, exactly the rows packed in memory.

Every shard is rebuilt alone from its cursor (after a round trip of the index through JSON) and
compared with the rows softcache.corpus_documents.pack_rows makes of the whole corpus: text
streams over several files with empty documents, whole text documents split across rows, chat
rows with bad ones skipped and long ones cut, row caps and shard sizes down to one row.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from softcache.corpus import python_docs, read_rows
from softcache.corpus_documents import Recipe, pack_rows
from softcache.corpus_stream import CorpusIndex, StreamedCorpus, corpus_key, index_corpus
from softcache.errors import SoftcacheError

from conftest import chatml_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def chatml():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Three files of paragraphs (JSON lines, one with empty rows, and a .txt file) and one long document."""
    paragraphs = [p for topic in python_docs()[:40] for p in topic.split("\n\n")]
    root = tmp_path_factory.mktemp("texts")
    rows = [{"text": t} for t in paragraphs[:150]]
    rows[5]["text"] = rows[77]["text"] = ""
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "b.txt").write_text(python_docs()[3] * 3)  # one document longer than most rows
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in paragraphs[150:350]))
    return root


def streamed_and_packed(rows, tokenizer, seq_len, shard_size, max_sequences=None, chat_template=None,
                        skip_bad_rows=False, **recipe):
    packed = pack_rows(rows, tokenizer, seq_len, max_sequences=max_sequences, chat_template=chat_template,
                       skip_bad_rows=skip_bad_rows, **recipe)
    resolved = Recipe.resolve(rows.shape, source=rows.source, chat_template=chat_template is not None, **recipe)
    index = index_corpus(rows, tokenizer, seq_len, shard_size, resolved, max_sequences=max_sequences,
                         chat_template=chat_template, skip_bad_rows=skip_bad_rows)
    index = CorpusIndex.from_dict(json.loads(json.dumps(index.to_dict())))  # as saved and read back
    return StreamedCorpus(index, rows, tokenizer, resolved, chat_template, skip_bad_rows), packed


def assert_same(streamed: StreamedCorpus, packed, shard_size: int) -> None:
    assert streamed.describe() == packed.describe() and streamed.summary() == packed.summary()
    assert streamed.num_sequences == packed.num_sequences
    for first in range(0, packed.num_sequences, shard_size):
        count = min(shard_size, packed.num_sequences - first)
        for mine, theirs in zip(streamed.shard(first, count), packed.shard(first, count), strict=True):
            if theirs is None:
                assert mine is None
            else:
                np.testing.assert_array_equal(mine, theirs)
                assert mine.dtype == theirs.dtype


@pytest.mark.parametrize("seq_len,shard_size,max_sequences", [(64, 1, None), (64, 7, None), (257, 3, 20), (1000, 4, None)])
def test_text_stream_shards_are_the_packed_rows(text_tokenizer, text_dir, seq_len, shard_size, max_sequences):
    rows = read_rows(str(text_dir))
    streamed, packed = streamed_and_packed(rows, text_tokenizer, seq_len, shard_size, max_sequences)
    assert packed.num_sequences > 2 * shard_size or max_sequences  # several shards, rows across files
    assert_same(streamed, packed, shard_size)


@pytest.mark.parametrize("packing,long,shard_size", [("documents", "split", 2), ("documents", "truncate", 5),
                                                     ("none", "split", 3), ("documents", "drop", 1)])
def test_text_documents_shards_are_the_packed_rows(text_tokenizer, text_dir, packing, long, shard_size):
    rows = read_rows(str(text_dir))
    streamed, packed = streamed_and_packed(rows, text_tokenizer, 96, shard_size, packing=packing, long=long)
    assert packed.long_split or packed.long_truncated or packed.long_dropped  # long documents were cut
    assert_same(streamed, packed, shard_size)


@pytest.mark.parametrize("seq_len,shard_size,max_sequences", [(256, 3, None), (128, 1, 25), (512, 4, None)])
def test_chat_shards_are_the_packed_rows(chatml, seq_len, shard_size, max_sequences):
    rows = read_rows("builtin:python-docs-chat", split="heldout")
    streamed, packed = streamed_and_packed(rows, chatml, seq_len, shard_size, max_sequences)
    assert packed.packing == "documents" and packed.teaching_positions < packed.num_sequences * seq_len
    assert_same(streamed, packed, shard_size)


def test_bad_chat_rows_skipped_alike(chatml, tmp_path):
    good = {"messages": [{"role": "user", "content": "What is a tuple?"},
                         {"role": "assistant", "content": "An immutable sequence. " * 3}]}
    bad = {"messages": [{"role": "user", "content": "No answer here."}]}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [good, bad, good, good, bad] * 9))
    streamed, packed = streamed_and_packed(read_rows(str(path)), chatml, 256, 2, skip_bad_rows=True,
                                           packing="documents")
    assert packed.bad_rows == 18
    assert_same(streamed, packed, 2)


def test_a_corpus_edited_after_indexing_is_refused(text_tokenizer, tmp_path):
    path = tmp_path / "t.txt"  # read as it is (datasets would serve its cached copy of a JSON file of equal size and time)
    path.write_text(python_docs()[7][:3000])
    rows = read_rows(str(path))
    streamed, packed = streamed_and_packed(rows, text_tokenizer, 32, 4)
    stat = path.stat()
    before = corpus_key({}, rows, "t")
    swapped = path.read_text().replace("a", "e")  # same size, other text
    path.write_text(swapped)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time: only the digests can tell
    assert corpus_key({}, read_rows(str(path)), "t") == before
    edited = StreamedCorpus(streamed.index, read_rows(str(path)), text_tokenizer, streamed.recipe)
    with pytest.raises(SoftcacheError, match=r"^--data .*t\.txt changed since the job read it: shard 1's rows "
                                             r"differ from the ones indexed"):
        edited.shard(4, 4)
    path.write_text(swapped + "\n")
    assert corpus_key({}, read_rows(str(path)), "t") != before  # a new size: the saved index is not reused


def spy(monkeypatch, target, name: str) -> list:
    """Record the arguments of each call of ``target.name``, which still runs."""
    calls = []
    original = getattr(target, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, recorded)
    return calls


def test_a_resumed_job_reads_only_the_shards_it_writes(cache_config, tmp_path, monkeypatch, corpus_file):
    from softcache import cache_job
    from softcache.cache_job import run_cache
    from softcache.store import StoreWriter

    from conftest import interrupted, store_files

    reference = cache_config(out=str(tmp_path / "reference"))
    run_cache(reference)
    config = cache_config(out=str(tmp_path / "resumed"))
    interrupted(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(config))  # during shard 2
    assert (tmp_path / "resumed" / "progress" / "corpus-index.json").is_file()

    indexed = spy(monkeypatch, cache_job, "index_corpus")
    rebuilt = spy(monkeypatch, StreamedCorpus, "shard")
    assert run_cache(config).sequences_written == 14
    assert indexed == [] and [first for _, first, _ in rebuilt] == [10, 15, 20]  # shards 2, 3 and 4 only
    assert store_files(tmp_path / "resumed") == store_files(tmp_path / "reference")
    assert not (tmp_path / "resumed" / "progress").exists()

    # A corpus file touched since: the index is made again (and the rows, being the same, are accepted).
    data = tmp_path / "docs.jsonl"
    data.write_bytes(corpus_file.read_bytes())
    config = cache_config(out=str(tmp_path / "touched"), data=str(data))
    interrupted(monkeypatch, StoreWriter, "write_shard", 2, lambda: run_cache(config))
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    indexed.clear()
    run_cache(config)
    assert len(indexed) == 1
    assert store_files(tmp_path / "touched") == store_files(tmp_path / "reference")


@pytest.mark.parametrize("damage", ["truncated", "resealed with a shard's cursor missing", "not sealed"])
def test_a_damaged_saved_index_is_not_trusted(cache_config, tmp_path, monkeypatch, damage):
    from softcache import cache_job
    from softcache.cache_job import run_cache
    from softcache.corpus_stream import INDEX_FILE, INDEX_SEAL
    from softcache.store import StoreWriter
    from softcache.store.manifest import sealed

    from conftest import interrupted, store_files

    run_cache(cache_config(out=str(tmp_path / "reference")))
    config = cache_config(out=str(tmp_path / "resumed"))
    interrupted(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(config))
    path = tmp_path / "resumed" / INDEX_FILE
    data = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text(path.read_text()[:len(path.read_text()) // 2])
    elif damage == "not sealed":
        data["digests"][0] = "0" * 64
        path.write_text(json.dumps(data))
    else:
        data["cursors"].pop()
        path.write_text(json.dumps(sealed(data, INDEX_SEAL)))
    indexed = spy(monkeypatch, cache_job, "index_corpus")
    run_cache(config)
    assert len(indexed) == 1  # read the corpus again rather than trust the file
    assert store_files(tmp_path / "resumed") == store_files(tmp_path / "reference")
