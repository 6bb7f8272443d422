"""Corpus reading and packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from softcache import SoftcacheError
from softcache.corpus import iter_documents, pack, python_docs

DOCS = ["alpha beta gamma", "delta", "epsilon zeta eta theta iota"]


class CharTokenizer:
    """One id per character (a..z -> 1..26, space -> 27); EOS is 0. Enough to check packing."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, return_attention_mask=False):
        assert not add_special_tokens
        return {"input_ids": [[27 if c == " " else ord(c) - 96 for c in text] for text in texts]}


def test_pack_joins_documents_with_eos_and_drops_the_tail():
    tokenizer = CharTokenizer()
    packed = pack(iter(DOCS), tokenizer, seq_len=8, source="mem")
    stream = [i for doc in tokenizer(DOCS)["input_ids"] for i in [*doc, 0]]
    assert packed.tokens_read == len(stream) == 51
    assert packed.input_ids.shape == (6, 8) and packed.input_ids.dtype == np.uint32
    assert packed.input_ids.reshape(-1).tolist() == stream[:48]
    assert packed.dropped_tokens == 3
    assert packed.documents == 3


def test_pack_is_deterministic_and_capped():
    a = pack(iter(DOCS), CharTokenizer(), seq_len=5, max_sequences=2)
    b = pack(iter(DOCS), CharTokenizer(), seq_len=5, max_sequences=2)
    assert a.input_ids.shape == (2, 5)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != pack(iter(DOCS), CharTokenizer(), seq_len=5, max_sequences=3).fingerprint


def test_pack_refuses_a_corpus_shorter_than_one_sequence():
    with pytest.raises(SoftcacheError, match="fewer than one sequence of --seq-len 100"):
        pack(iter(["short"]), CharTokenizer(), seq_len=100)
    with pytest.raises(SoftcacheError, match="fewer than one sequence"):
        pack(iter(["a", "b"]), CharTokenizer(), seq_len=5)


def test_pack_skips_documents_without_text():
    tokenizer = CharTokenizer()
    packed = pack(iter(["", "ab", "  \n\t", "cd", ""]), tokenizer, seq_len=3, source="mem")
    assert packed.input_ids.reshape(-1).tolist() == [1, 2, 0, 3, 4, 0]  # no EOS without text before it
    assert (packed.documents, packed.empty_documents) == (2, 3)
    assert packed.fingerprint == pack(iter(["ab", "cd"]), tokenizer, seq_len=3).fingerprint


@pytest.mark.parametrize("documents,found", [
    ([], "it holds no documents"),
    ([""], "its 1 documents are all empty"),
    (["", " ", "\n\n", "\t \r\n"], "its 4 documents are all empty or whitespace"),
])
def test_pack_refuses_a_corpus_without_text(documents, found):
    with pytest.raises(SoftcacheError, match=f"^--data c.jsonl has no text to cache: {found}"):
        pack(iter(documents), CharTokenizer(), seq_len=2, source="c.jsonl")


def test_builtin_corpus_ships_with_python_and_splits_deterministically():
    everything = list(iter_documents("builtin:python-docs", split="all"))
    assert everything == python_docs() and len(everything) > 50 and sum(map(len, everything)) > 300_000
    train = list(iter_documents("builtin:python-docs"))  # the default split is train
    heldout = list(iter_documents("builtin:python-docs", split="heldout"))
    assert len(train) + len(heldout) == len(everything) and not set(train) & set(heldout)
    assert heldout == everything[4::5]
    with pytest.raises(SoftcacheError, match="--split dev: builtin:python-docs has the splits train, heldout, all"):
        list(iter_documents("builtin:python-docs", split="dev"))
    with pytest.raises(SoftcacheError, match="unknown built-in corpus"):
        list(iter_documents("builtin:nope"))


def _write(path, kind):
    rows = [{"text": t, "n": i} for i, t in enumerate(DOCS)]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path.write_text("text,n\n" + "".join(f"{r['text']},{r['n']}\n" for r in rows))
    elif kind in ("parquet", "arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": DOCS, "n": list(range(3))})
        if kind == "parquet":
            pq.write_table(table, path)
        else:
            with pa.ipc.new_stream(path, table.schema) as writer:
                writer.write_table(table)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "arrow"])
def test_file_formats(tmp_path, kind):
    path = tmp_path / f"corpus.{kind}"
    _write(path, kind)
    assert list(iter_documents(str(path))) == DOCS


def test_text_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["line one\nline two\n"]


def test_save_to_disk_directory_and_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS}),
                          "test": datasets.Dataset.from_dict({"body": ["held out"]})}).save_to_disk(tmp_path / "dd")
    assert list(iter_documents(str(tmp_path / "dd"), text_column="body")) == DOCS
    assert list(iter_documents(str(tmp_path / "dd"), text_column="body", split="test")) == ["held out"]
    with pytest.raises(SoftcacheError, match="no split 'dev'.*--split"):
        list(iter_documents(str(tmp_path / "dd"), text_column="body", split="dev"))


def test_corpus_errors_name_the_flag(tmp_path):
    path = tmp_path / "c.jsonl"
    _write(path, "jsonl")
    with pytest.raises(SoftcacheError, match="has no column 'body'.*--text-column"):
        list(iter_documents(str(path), text_column="body"))
    with pytest.raises(SoftcacheError, match="holds int, not text"):
        list(iter_documents(str(path), text_column="n"))
    with pytest.raises(SoftcacheError, match="does not exist"):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "c.bin").write_bytes(b"\0\1")
    with pytest.raises(SoftcacheError, match="unsupported file type .bin"):
        list(iter_documents(str(tmp_path / "c.bin")))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(SoftcacheError, match="could not be read"):
        list(iter_documents(str(tmp_path / "broken.jsonl")))
