"""Corpus preparation: read documents, tokenize them, pack them into fixed-length sequences.

Packing is deterministic: documents are read in a fixed order (:func:`iter_documents`), each one
holding text is tokenized without special tokens and followed by the tokenizer's EOS token (empty
ones are skipped, so no EOS stands alone), and the resulting stream is cut into
consecutive sequences of ``seq_len`` tokens. The trailing tokens that do not fill a whole sequence
are dropped (and counted in :class:`PackedCorpus`), so every cached position has a real context.
Token ids are held in memory as uint32 (4 bytes per token): a corpus must fit in RAM as ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softcache.corpus_dir import BUILDERS, corpus_files, is_saved_dataset
from softcache.corpus_errors import encoding_problem, unreadable
from softcache.errors import SoftcacheError

BUILTIN_CORPORA = ("builtin:python-docs",)
_TOKENIZE_BATCH = 512  # documents per fast-tokenizer call


@dataclass
class PackedCorpus:
    """The packed token ids and what was done to get them."""

    input_ids: np.ndarray
    """[num_sequences, seq_len] uint32 token ids."""
    source: str
    documents: int
    """Documents tokenized (reading stops in batches once ``max_sequences`` is reached)."""
    tokens_read: int
    """Tokens in the stream, EOS separators included."""
    dropped_tokens: int
    """Tokens read but in no sequence: the incomplete tail, and anything past ``max_sequences``."""
    empty_documents: int = 0
    """Documents skipped because they hold no text (empty, whitespace only, or a missing value)."""
    teach: np.ndarray | None = None
    """[num_sequences, seq_len] bool: the positions that teach; None: every position (a stream)."""
    segments: np.ndarray | None = None
    """[num_sequences, seq_len] int32 document numbers within each row; None: one stream."""

    @property
    def fingerprint(self) -> str:
        """sha256 of the packed ids as little-endian uint32: equal ids, equal fingerprint."""
        return hashlib.sha256(np.ascontiguousarray(self.input_ids, dtype="<u4").tobytes()).hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "documents": self.documents,
            "tokens_read": self.tokens_read,
            "dropped_tokens": self.dropped_tokens,
            "fingerprint": self.fingerprint,
        }


BUILTIN_SPLITS = ("train", "heldout", "all")


def python_docs(split: str = "all") -> list[str]:
    """The built-in corpus: Python's documentation topics (``pydoc_data.topics``), sorted by topic.

    Split deterministically: every fifth topic (positions 4, 9, 14, ...) is ``heldout``, the rest
    ``train``; ``all`` is every topic.
    """
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics)]
    if split == "all":
        return documents
    return [doc for i, doc in enumerate(documents) if (i % 5 == 4) == (split == "heldout")]


def iter_documents(data: str, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the documents of ``data``: the text of each, in a fixed order (a missing value as "").

    ``data`` is one of:

    - ``builtin:python-docs`` (splits train, heldout, all);
    - a file: .txt/.text/.md is one document (the whole file); .json/.jsonl/.ndjson, .parquet,
      .csv/.tsv and .arrow are one document per row (the ``text_column`` value). Its one split is
      ``train``;
    - a directory written by ``Dataset.save_to_disk`` (its splits);
    - any other directory: every file under it, recursively, in sorted path order, each read as
      above by its own type, so text, JSON and CSV files can be mixed. Names starting with ``.``
      are not read. A file of any other type, or a softcache store, refuses the whole directory
      (nothing is skipped unsaid). Split names in sub-directory or file names (``train/``,
      ``test.jsonl``) divide the files into splits as Hugging Face datasets does
      (:mod:`softcache.corpus_dir`); else every file is in ``train``.

    Every file must be UTF-8. Empty documents are yielded too: :func:`pack` skips them. Raises
    :class:`SoftcacheError` naming ``--data`` and the file (with the line or byte where known).
    """
    if data.startswith("builtin:"):
        if data != "builtin:python-docs":
            raise SoftcacheError(f"--data {data}: unknown built-in corpus; known: {', '.join(BUILTIN_CORPORA)}")
        if split not in BUILTIN_SPLITS:
            raise SoftcacheError(f"--split {split}: {data} has the splits {', '.join(BUILTIN_SPLITS)}")
        yield from python_docs(split)
        return
    path = Path(data)
    if not path.exists():
        raise SoftcacheError(f"--data {data} does not exist")
    if not path.is_file() and not path.is_dir():  # a pipe or a device: reading it would block or never end
        raise SoftcacheError(f"--data {data} is not a regular file or a directory")
    if is_saved_dataset(path):
        yield from _text_column(path, "saved dataset", text_column, lambda: _load_saved(path, split))
        return
    if path.is_dir():
        files = corpus_files(path, split)
    elif split != "train":
        raise SoftcacheError(f"--data {data} has no split {split!r} (splits: train); choose one with --split")
    else:
        files = [path]
    for file in files:
        yield from _read_file(file, text_column)


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise SoftcacheError(f"--data {path}: unsupported file type {path.suffix or '(none)'}; "
                             f"use one of {', '.join(sorted(BUILDERS))} or a save_to_disk directory")
    if builder == "text":
        yield _read_text(path)
        return
    if builder in ("json", "csv") and _blank(path):
        return  # no rows (datasets fails on such a file)
    options = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    yield from _text_column(path, builder, text_column,
                            lambda: _load(builder, data_files=str(path), split="train", **options))


def _read_text(path: Path) -> str:
    """The whole file as one document, newlines translated as datasets' text builder does (open's default)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        raise SoftcacheError(encoding_problem(path) or f"--data {path} is not UTF-8: {err}") from err
    if "\0" in text:  # valid UTF-8, but no text holds NUL: UTF-16 without a byte-order mark
        raise SoftcacheError(encoding_problem(path))
    return text


def _blank(path: Path) -> bool:
    """Whether the file holds nothing but whitespace."""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _text_column(path: Path, builder: str, text_column: str, load) -> Iterator[str]:
    """The ``text_column`` values of the dataset ``load()`` returns; any failure of datasets, loading
    or iterating, becomes one line naming ``path`` and the cause (see :func:`unreadable`)."""
    try:
        dataset = load()
        if text_column not in dataset.column_names:
            raise SoftcacheError(
                f"--data {path} has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); "
                "choose one with --text-column"
            )
        for batch in dataset.select_columns([text_column]).iter(batch_size=1024):
            for text in batch[text_column]:
                if text is not None and not isinstance(text, str):
                    raise SoftcacheError(
                        f"--data {path}: column {text_column!r} holds {type(text).__name__}, not text; "
                        "choose a text column with --text-column"
                    )
                yield text or ""
    except SoftcacheError:
        raise
    except Exception as err:  # datasets raises many types (and wraps them) for unreadable input
        raise SoftcacheError(unreadable(path, builder, text_column, err)) from err


def _load_saved(path: Path, split: str):
    import datasets

    datasets.disable_progress_bars()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SoftcacheError(f"--data {path} has no split {split!r} (splits: {', '.join(loaded)}); "
                                 "choose one with --split")
        loaded = loaded[split]
    return loaded


def _load(builder: str, **options):
    """``datasets.load_dataset`` without its progress bars and its own error log lines (the error is ours to say)."""
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        return datasets.load_dataset(builder, **options)
    finally:
        datasets.logging.set_verbosity(verbosity)


def pack(
    documents: Iterator[str],
    tokenizer,
    seq_len: int,
    max_sequences: int | None = None,
    source: str = "",
) -> PackedCorpus:
    """Tokenize ``documents`` in batches, join them with EOS and cut the stream into sequences.

    A document that is empty or only whitespace is skipped (counted in ``empty_documents``): it
    would add an EOS with nothing before it. Stops reading once ``max_sequences`` full sequences
    exist. Raises :class:`SoftcacheError` when the tokenizer has no EOS token, no document holds
    text, or the corpus is too short for a single sequence; ``source`` (the ``--data`` value)
    names the corpus in those messages.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SoftcacheError("the teacher's tokenizer has no EOS token, which packing needs to separate documents")
    limit = None if max_sequences is None else max_sequences * seq_len
    pieces: list[np.ndarray] = []
    total = 0
    n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for ids in encoded:
            piece = np.empty(len(ids) + 1, dtype=np.uint32)
            piece[:-1] = ids
            piece[-1] = eos
            pieces.append(piece)
            total += len(piece)
        batch.clear()

    empty = 0
    for text in documents:
        if not text or text.isspace():
            empty += 1
            continue
        batch.append(text)
        n_docs += 1
        if len(batch) == _TOKENIZE_BATCH:
            flush()
            if limit is not None and total >= limit:
                break
    if batch and (limit is None or total < limit):
        flush()
    corpus = f"--data {source}" if source else "the corpus"
    if not n_docs:
        found = (f"its {empty:,} documents are all empty or whitespace" if empty > 1 else
                 "its one document is empty or whitespace") if empty else "it holds no documents"
        raise SoftcacheError(f"{corpus} has no text to cache: {found}")
    stream = np.concatenate(pieces)
    n_seq = len(stream) // seq_len
    if max_sequences is not None:
        n_seq = min(n_seq, max_sequences)
    if n_seq == 0:
        raise SoftcacheError(
            f"{corpus} has {len(stream)} tokens, fewer than one sequence of "
            f"--seq-len {seq_len}; give more text or a smaller --seq-len"
        )
    used = n_seq * seq_len
    return PackedCorpus(
        input_ids=stream[:used].reshape(n_seq, seq_len),
        source=source,
        documents=n_docs,
        tokens_read=int(len(stream)),
        dropped_tokens=int(len(stream) - used),
        empty_documents=empty,
    )
