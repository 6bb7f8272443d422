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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softcache.errors import SoftcacheError

BUILTIN_CORPORA = ("builtin:python-docs",)
_BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow",
}
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
    """Yield the documents of ``data`` in stored order.

    ``data`` is ``builtin:python-docs`` (splits train, heldout, all), a file (.txt/.md: one document per file; .json/.jsonl,
    .parquet, .csv/.tsv, .arrow: one document per row), a directory written by
    ``Dataset.save_to_disk``, or a directory of such files.
    """
    if data.startswith("builtin:"):
        if data != "builtin:python-docs":
            raise SoftcacheError(f"--data {data}: unknown built-in corpus; known: {', '.join(BUILTIN_CORPORA)}")
        if split not in BUILTIN_SPLITS:
            raise SoftcacheError(f"--split {split}: {data} has the splits {', '.join(BUILTIN_SPLITS)}")
        yield from python_docs(split)
        return
    dataset = _load_dataset(data, split)
    if text_column not in dataset.column_names:
        raise SoftcacheError(
            f"--data {data} has no column {text_column!r} (columns: {', '.join(dataset.column_names)}); "
            "choose one with --text-column"
        )
    for batch in dataset.select_columns([text_column]).iter(batch_size=1024):
        for text in batch[text_column]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise SoftcacheError(
                    f"--data {data}: column {text_column!r} holds {type(text).__name__}, not text; "
                    "choose a text column with --text-column"
                )
            yield text


def _load_dataset(data: str, split: str):
    import datasets

    path = Path(data)
    if not path.exists():
        raise SoftcacheError(f"--data {data} does not exist")
    datasets.disable_progress_bars()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), **_text_options(path))
        else:
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise SoftcacheError(
                    f"--data {data}: unsupported file type {path.suffix or '(none)'}; "
                    f"use one of {', '.join(sorted(_BUILDERS))} or a save_to_disk directory"
                )
            options = {"sample_by": "document"} if builder == "text" else {}
            if path.suffix.lower() == ".tsv":
                options = {"sep": "\t"}
            loaded = datasets.load_dataset(builder, data_files=str(path), **options)
    except SoftcacheError:
        raise
    except Exception as err:  # datasets raises many types for unreadable input
        raise SoftcacheError(f"--data {data} could not be read: {type(err).__name__}: {err}".splitlines()[0]) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SoftcacheError(f"--data {data} has no split {split!r} (splits: {', '.join(loaded)}); choose one with --split")
        loaded = loaded[split]
    return loaded


def _text_options(directory: Path) -> dict:
    """A directory of plain-text files is read one document per file, like a single text file."""
    suffixes = {p.suffix.lower() for p in directory.rglob("*") if p.is_file()}
    return {"sample_by": "document"} if suffixes and suffixes <= {".txt", ".text", ".md"} else {}


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
        found = f"its {empty:,} documents are all empty or whitespace" if empty else "it holds no documents"
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
