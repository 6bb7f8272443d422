"""Corpus reading and packing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from softcache import SoftcacheError
from softcache.chat import InputShape
from softcache.corpus import iter_documents, pack, python_docs, read_rows

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
    ([""], "its one document is empty"),
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
    with pytest.raises(SoftcacheError, match="has no split 'test' \\(splits: train\\)"):
        list(iter_documents(str(path), split="test"))


# ---- directories: every file read, or one line naming what would be left out ----


ROWS = None  # in a _tree: the DOCS rows, written in the file's format


def _tree(root, files: dict):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is ROWS:
            _write(path, path.suffix[1:])
        else:
            path.write_text(content)
    return str(root)


def test_a_directory_reads_every_file_by_its_type_in_sorted_order(tmp_path):
    corpus = _tree(tmp_path, {"b.jsonl": ROWS, "a.txt": "one\ntext\n", "sub/c.csv": ROWS, "d.parquet": ROWS,
                              "e.md": "# notes", "f.arrow": ROWS, ".hidden.txt": "not read", ".git/x.txt": "not read"})
    assert list(iter_documents(corpus)) == ["one\ntext\n", *DOCS, *DOCS, "# notes", *DOCS, *DOCS]


def test_a_directory_with_files_it_cannot_read_is_refused_naming_them(tmp_path):
    corpus = _tree(tmp_path, {"a.txt": "text", "b.jsonl": ROWS, "notes.pdf": "x", "sub/model.bin": "x"})
    with pytest.raises(SoftcacheError, match=r"notes.pdf, sub/model.bin are of no supported type and would be skipped"):
        list(iter_documents(corpus))
    only = _tree(tmp_path / "only", {f"{i}.bin": "x" for i in range(5)})
    with pytest.raises(SoftcacheError, match=r": 0.bin, 1.bin, 2.bin and 2 more are of no supported type"):
        list(iter_documents(only))
    hidden = _tree(tmp_path / "hidden", {".a.txt": "x"})
    with pytest.raises(SoftcacheError, match="holds no files to read"):
        list(iter_documents(hidden))


def test_a_directory_holding_a_softcache_store_is_refused(tmp_path):
    corpus = _tree(tmp_path, {"a.txt": "text", "store/manifest.json": json.dumps({"format": "softcache-store"})})
    with pytest.raises(SoftcacheError, match="holds the softcache store .*store, which is not corpus text"):
        list(iter_documents(corpus))
    (tmp_path / "store" / "manifest.json").write_text(json.dumps({"text": "a JSON file of the corpus"}))
    assert list(iter_documents(corpus)) == ["text", "a JSON file of the corpus"]


def test_split_names_divide_a_directory_as_datasets_does(tmp_path):
    by_file = _tree(tmp_path / "files", {"train.jsonl": ROWS, "wiki_test-00000.txt": "held out", "dev.csv": ROWS})
    assert list(iter_documents(by_file)) == DOCS
    assert list(iter_documents(by_file, split="test")) == ["held out"]
    assert list(iter_documents(by_file, split="validation")) == DOCS
    by_dir = _tree(tmp_path / "dirs", {"train/a.txt": "a", "train/b/c.txt": "c", "test/d.txt": "d"})
    assert list(iter_documents(by_dir)) == ["a", "c"]
    with pytest.raises(SoftcacheError, match="has no split 'validation' \\(splits: train, test\\); choose one with --split"):
        list(iter_documents(by_dir, split="validation"))
    (tmp_path / "dirs" / "README.md").write_text("about")
    with pytest.raises(SoftcacheError, match="names the splits train, test but README.md is in none of them"):
        list(iter_documents(by_dir))
    assert list(iter_documents(_tree(tmp_path / "plain", {"retrain.txt": "x", "contest.txt": "y"}))) == ["y", "x"]


def test_text_files_read_as_datasets_reads_them(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_bytes("caf\u00e9\r\nline\rend\n\ufeff".encode())
    expected = datasets.load_dataset("text", data_files=str(tmp_path / "a.txt"), sample_by="document", split="train")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == expected["text"]  # the same corpus fingerprint as before


def test_missing_and_empty_values_are_empty_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"text": null}\n{"other": 1}\n{"text": ""}\n{"text": " "}\n')
    assert list(iter_documents(str(path))) == ["a", "", "", "", " "]
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "blank.csv").write_text("")
    assert list(iter_documents(str(tmp_path / "blank.jsonl"))) == list(iter_documents(str(tmp_path / "blank.csv"))) == []


# ---- unreadable files: the file, the place in it and the cause, in one line ----


@pytest.mark.parametrize("name,content,message", [
    ("utf16.txt", "caf\u00e9".encode("utf-16"), r"utf16.txt is not UTF-8 \(byte 0 invalid start byte; it looks like UTF-16\)"),
    ("utf16le.txt", "caf\u00e9".encode("utf-16-le"), r"utf16le.txt is not UTF-8 \(byte 1 is a NUL; it looks like UTF-16\)"),
    ("latin1.txt", "ok\ncaf\u00e9!".encode("latin-1"), r"latin1.txt is not UTF-8 \(byte 6 invalid continuation byte;"),
    ("late.txt", b"a" * 3_000_000 + b"\xff", r"late.txt is not UTF-8 \(byte 3,000,000 invalid start byte"),
    ("utf16.jsonl", '{"text": "a"}\n'.encode("utf-16"), r"utf16.jsonl is not UTF-8 \(byte 0 .*UTF-16"),
    ("latin1.jsonl", '{"text": "a"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), r"latin1.jsonl is not UTF-8 \(byte 27 "),
    ("latin1.csv", "text\ncaf\u00e9\n".encode("latin-1"), r"latin1.csv is not UTF-8 \(byte 8 "),
])
def test_a_file_that_is_not_utf8_names_the_byte_and_asks_to_reencode(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SoftcacheError, match=f"^--data .*{message}.*; re-encode it as UTF-8") as caught:
        list(iter_documents(str(tmp_path / name)))
    assert "\n" not in str(caught.value)
    _tree(tmp_path / "dir", {"a.txt": "fine"})
    (tmp_path / "dir" / name).write_bytes(content)  # inside a directory, the file is still named
    with pytest.raises(SoftcacheError, match=f"dir/{message}"):
        list(iter_documents(str(tmp_path / "dir")))


@pytest.mark.parametrize("name,content,message", [
    ("broken.jsonl", "{not json\n", r"broken.jsonl line 1, column 2: not valid JSON \(Expecting property name enclosed in double quotes\)"),
    ("late.jsonl", '{"text": "a"}\n\n{"text": "b",}\n', r"late.jsonl line 3, column 14: not valid JSON \(.+\)"),
    ("array.jsonl", '{"text": "a"}\n[1, 2]\n', r"array.jsonl line 2: a JSON array, not an object"),
    ("string.jsonl", '{"text": "a"}\n"b"\n', r"string.jsonl line 2: a JSON string, not an object"),
    ("document.json", '[\n  {"text": "a"},\n  {"text": }\n]\n', r"document.json line 3, column 12: not valid JSON \(Expecting value\)"),
])
def test_a_bad_json_line_names_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SoftcacheError, match=f"^--data .*{message}$"):
        list(iter_documents(str(tmp_path / name)))


def test_a_damaged_file_shows_the_parser_error_not_the_datasets_wrapper(tmp_path, capfd):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    (tmp_path / "c.parquet").write_bytes((tmp_path / "c.parquet").read_bytes()[:20])
    with pytest.raises(SoftcacheError, match=r"c.parquet could not be read as parquet: ArrowInvalid: Parquet magic"):
        list(iter_documents(str(tmp_path / "c.parquet")))
    (tmp_path / "c.csv").write_text('text\n"never closed\n')
    with pytest.raises(SoftcacheError, match=r"c.csv could not be read as csv: ParserError: .*EOF inside string") as caught:
        list(iter_documents(str(tmp_path / "c.csv")))
    assert "DatasetGenerationError" not in str(caught.value)
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(SoftcacheError):
        list(iter_documents(str(tmp_path / "c.jsonl")))
    assert "Failed to" not in capfd.readouterr().err  # datasets' own error log stays quiet: the error is one line


# ---- rows of any input shape (issue 14) ----

TURNS = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "name": "bot"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
          {"role": "assistant", "content": "4"}]]


def _rows_file(path, rows):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rows_of_turns_come_as_lists_of_dicts(tmp_path, suffix):
    path = _rows_file(tmp_path / f"c{suffix}", [{"messages": turns, "id": i} for i, turns in enumerate(TURNS)])
    rows = read_rows(path)
    assert rows.shape is InputShape.MESSAGES and rows.columns == ("messages",)
    read = list(rows)
    assert [(where, index) for where, index, _ in read] == [(path, 0), (path, 1)]
    for (_, _, row), turns in zip(read, TURNS):
        assert list(row) == ["messages"] and isinstance(row["messages"], list)
        # parquet gives every turn every key (missing ones as None); softcache.chat drops those
        assert [{k: v for k, v in turn.items() if v is not None} for turn in row["messages"]] == turns
    pairs = _rows_file(tmp_path / f"p{suffix}", [{"prompt": TURNS[1][:2], "completion": TURNS[1][2:]}])
    (_, _, row), = read_rows(pairs)
    assert read_rows(pairs).shape is InputShape.PROMPT_COMPLETION
    assert [{k: v for k, v in t.items() if v is not None} for t in row["prompt"] + row["completion"]] == TURNS[1]


def test_input_shape_found_from_the_columns_or_given(tmp_path):
    pairs = _rows_file(tmp_path / "p.jsonl", [{"prompt": "Q?", "completion": "A."}])
    assert read_rows(pairs).shape is InputShape.PROMPT_COMPLETION
    assert list(read_rows(pairs)) == [(pairs, 0, {"prompt": "Q?", "completion": "A."})]
    assert read_rows("builtin:python-docs").shape is InputShape.TEXT
    both = _rows_file(tmp_path / "both.jsonl", [{"messages": TURNS[0], "text": "plain"}])
    with pytest.raises(SoftcacheError, match=f"^--data {re.escape(both)}: the corpus fits more than one input shape "
                                             r"\(messages, text; columns: messages, text\); choose one with "
                                             "--input-shape$"):
        read_rows(both)
    assert list(read_rows(both, shape="text")) == [(both, 0, "plain")]
    assert read_rows(both, shape="messages").shape is InputShape.MESSAGES
    with pytest.raises(SoftcacheError, match=f"^--data {re.escape(pairs)}: --input-shape messages needs the column "
                                             r"'messages' \(columns: prompt, completion\)$"):
        read_rows(pairs, shape="messages")
    with pytest.raises(SoftcacheError, match="^--data builtin:python-docs: --input-shape prompt_completion needs"):
        read_rows("builtin:python-docs", shape="prompt_completion")
    half = _rows_file(tmp_path / "half.jsonl", [{"prompt": "Q?", "answer": "A."}])
    with pytest.raises(SoftcacheError, match=r"\(columns: prompt, answer\) \('prompt' needs a 'completion' column\)"):
        read_rows(half)


def test_a_directory_holds_one_input_shape(tmp_path):
    _rows_file(tmp_path / "a.jsonl", [{"messages": turns} for turns in TURNS])
    _rows_file(tmp_path / "b.parquet", [{"messages": TURNS[1]}])
    rows = read_rows(str(tmp_path))
    assert [(Path(where).name, index) for where, index, _ in rows] == [("a.jsonl", 0), ("a.jsonl", 1),
                                                                       ("b.parquet", 0)]  # numbered per file
    assert len(rows) == 3 and len(read_rows("builtin:python-docs", split="heldout")) == len(python_docs()[4::5])
    _rows_file(tmp_path / "c.jsonl", [{"text": "plain", "n": 1}])
    with pytest.raises(SoftcacheError, match=f"^--data {tmp_path}/c.jsonl holds text rows \\(columns: text, n\\) but "
                                             f"{tmp_path}/a.jsonl holds messages rows; every file of --data must hold "
                                             "rows of one input shape$"):
        read_rows(str(tmp_path))  # refused before any row is read
    (tmp_path / "0.txt").write_text("a text file is a text row")
    with pytest.raises(SoftcacheError, match="a.jsonl holds messages rows .* but .*0.txt holds text rows"):
        read_rows(str(tmp_path))
