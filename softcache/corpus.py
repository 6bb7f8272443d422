"""Corpus reading: the rows of ``--data``, in a fixed order, all of one input shape.

``--data`` is the built-in corpus, a file, a directory of files or a ``save_to_disk`` directory
(:func:`read_rows`), or from elsewhere (softcache.corpus_sources): a Hugging Face dataset by name
(``hf:owner/name``) or an fsspec URL of a file or directory, read through a local mirror. Its rows
are text (one column: plain documents), ``messages`` or ``prompt`` and
``completion`` (softcache.chat.InputShape): the shape the first file's columns show, or the one
``--input-shape`` names. Every file must hold that shape (one store holds one kind of row): each
file's columns are read (datasets loads it, memory-mapped) before any row is, so a file of another
shape is refused at once, not after hours of rendering. Row numbers, in error lines too, count from
0 within each file (within the split of a saved dataset).

Packing the rows is softcache.documents' (``pack`` and ``PackedCorpus`` are re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from softcache.chat import InputShape, input_shape
from softcache.corpus_dir import BUILDERS, corpus_files, is_saved_dataset
from softcache.corpus_errors import encoding_problem, unreadable
from softcache.corpus_sources import HF_PREFIX, Mirrored, hf_stamp, is_url, load_hf, quiet_datasets
from softcache.documents import PackedCorpus, pack
from softcache.errors import SoftcacheError
from softcache.packers import Place

__all__ = ["BUILTIN_CORPORA", "CorpusRows", "PackedCorpus", "iter_documents", "pack", "python_docs", "read_rows"]

BUILTIN_CORPORA = ("builtin:python-docs", "builtin:python-docs-chat")
BUILTIN_SPLITS = ("train", "heldout", "all")
_READ_BATCH = 1024  # rows per batch read from a dataset
_CHAT_COLUMNS = {"messages", "prompt", "completion"}
HF_BUILDER = "Hugging Face dataset"


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


def read_rows(data: str | list[str], text_column: str = "text", split: str = "train",
              shape: str | None = None, streaming: bool = False) -> CorpusRows:
    """The rows of ``data``, of the input ``shape`` (``--input-shape``; None: found from the columns).

    ``data`` is one of the following, or a list of them read one after the other (as the files of a
    directory are):

    - ``builtin:python-docs`` (text; splits train, heldout, all);
    - ``builtin:python-docs-chat`` (``messages`` rows: conversations about those topics, softcache.chat_corpus;
      the same splits);
    - a file: .txt/.text/.md is one text row (the whole file); .json/.jsonl/.ndjson, .parquet,
      .csv/.tsv and .arrow hold one row per record. Its one split is ``train``;
    - a directory written by ``Dataset.save_to_disk`` (its splits);
    - any other directory: every file under it, recursively, in sorted path order, each read as
      above by its own type, so text, JSON and CSV files can be mixed. Names starting with ``.``
      are not read. A file of any other type, or a softcache store, refuses the whole directory
      (nothing is skipped unsaid). Split names in sub-directory or file names (``train/``,
      ``test.jsonl``) divide the files into splits as Hugging Face datasets does
      (:mod:`softcache.corpus_dir`); else every file is in ``train``;
    - ``hf:owner/name`` or ``hf:owner/name:config``: a Hugging Face dataset, from the local cache
      when offline (its splits);
    - an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``, ...) of a file or a directory:
      copied into a local mirror, then read as the local file or directory would be (errors name the URL).

    Without ``shape``, a file with none of the columns ``messages``, ``prompt``, ``completion`` is
    text (its ``text_column``), else :func:`softcache.chat.input_shape` decides. Every file must be
    UTF-8. Raises :class:`SoftcacheError` naming ``--data`` and the file (with the line or byte where
    known), here for a file that cannot be loaded or holds another shape than the first.
    """
    corpora = [data] if isinstance(data, str) else list(data)
    parts = [part for corpus in corpora for part in _parts(corpus, split, streaming)]
    found, first = None, None
    for part in parts:
        columns = part.columns(text_column)
        if columns is None:  # no rows
            continue
        its = _shape_of(part, columns, shape, text_column)
        if found is None:
            found, first = its, part
        elif its != found:
            raise SoftcacheError(f"--data {part.where} holds {its} rows (columns: {', '.join(columns)}) but "
                                 f"{first.where} holds {found} rows; every file of --data must hold rows of one "
                                 "input shape")
    if found is None:  # no file holds a row: nothing to detect, nothing to read
        found = InputShape(shape or InputShape.TEXT)
    return CorpusRows(" + ".join(corpora), found, _fields(found, text_column), parts)


def iter_documents(data: str, text_column: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the documents of ``data`` read as text (see :func:`read_rows`): each row's ``text_column``
    (a missing value as ""), in a fixed order. Empty documents are yielded too: :func:`pack` skips them."""
    for _, _, text in read_rows(data, text_column, split, InputShape.TEXT):
        yield text


@dataclass
class CorpusRows:
    """The rows of ``--data``, all of one input shape."""

    source: str
    """The ``--data`` value (several joined by `` + ``)."""
    shape: InputShape
    columns: tuple[str, ...]
    """The columns a row holds: ``(text_column,)``, ``("messages",)`` or ``("prompt", "completion")``."""
    parts: list[_Part]

    def __len__(self) -> int:
        """Rows in all files (empty and bad ones included; a streamed file's count as 0: unknown)."""
        return sum(len(part) for part in self.parts)

    def total(self) -> int | None:
        """Rows in all files, for a progress bar; None when a streamed file's count is not known."""
        return None if any(part.streamed for part in self.parts) else len(self)

    def __iter__(self) -> Iterator[tuple[str, int, str | dict]]:
        """``(file, row, value)``: the file, the row's number in it (from 0), and for text the row's text (a
        missing value as ""), else a dict of :attr:`columns` (list columns as lists of dicts)."""
        for _, where, index, value in self.positioned():
            yield where, index, value

    def positioned(self, start: Place | None = None) -> Iterator[tuple[Place, str, int, str | dict]]:
        """``(place, file, row, value)`` from the place ``start`` on (None: the first row): the rows as
        :meth:`__iter__` gives them, each with its place, from which reading can start again without
        reading what came before: (the file's number among the parts, the row's within it), and for a
        streamed file (``--streaming``) datasets' state of the stream before that row, as JSON."""
        text = self.shape == InputShape.TEXT
        first_part, first_row, resume = (0, 0, None) if start is None else (*start, None)[:3]
        for number, part in enumerate(self.parts[first_part:], first_part):
            skip, state = (first_row, resume) if number == first_part else (0, None)
            values = part.values(list(self.columns), self.columns[0] if text else None, skip, state)
            for index, (stream_state, row) in enumerate(values, skip):
                place = (number, index) if stream_state is None else (number, index, stream_state)
                if not text:
                    yield place, part.where, index, dict(zip(self.columns, row))
                    continue
                if row[0] is not None and not isinstance(row[0], str):
                    raise SoftcacheError(f"--data {part.where}: column {self.columns[0]!r} holds "
                                         f"{type(row[0]).__name__}, not text; choose a text column with --text-column")
                yield place, part.where, index, row[0] or ""


def _fields(shape: InputShape, text_column: str) -> tuple[str, ...]:
    return {InputShape.TEXT: (text_column,), InputShape.MESSAGES: ("messages",),
            InputShape.PROMPT_COMPLETION: ("prompt", "completion")}[shape]


def _shape_of(part: _Part, columns: list[str], override: str | None, text_column: str) -> InputShape:
    """The input shape of one file's ``columns``: ``override`` if given (the file must have its columns),
    text when none of the chat columns is there (as every corpus was before chat rows), else the one
    shape they fit (softcache.chat.input_shape)."""
    if override == InputShape.TEXT or (override is None and not _CHAT_COLUMNS & set(columns)):
        if text_column not in columns:
            raise SoftcacheError(f"--data {part.where} has no column {text_column!r} (columns: {', '.join(columns)}); "
                                 "choose one with --text-column")
        return InputShape.TEXT
    try:
        return input_shape(columns, override, text_column)
    except SoftcacheError as err:
        raise SoftcacheError(f"--data {part.where}: {err}") from None


class _Part:
    """One file of ``--data`` (or a saved dataset, or the built-in corpus): its columns and its rows.
    Text parts (a .txt file, the built-in corpus) have one column; dataset parts are loaded by
    datasets, once, when their columns are first asked for; a blank JSON or CSV file has no rows."""

    def __init__(self, where: Path | str, builder: str, texts: Callable[[], list[str]] | None = None,
                 load: Callable[[], object] | None = None, size: int = 0, mirror: Mirrored | None = None):
        self.where, self.builder, self._texts, self._load = str(where), builder, texts, load
        self.path = Path(where)
        """The local file read (a mirrored file's copy); :attr:`where` is what messages name."""
        self.mirror = mirror
        if mirror is not None:
            self.where = mirror.named(str(where))
        self._columns: list[str] | None = None
        self._dataset = None
        self._size = size
        self.streamed = False
        """Read through datasets' streaming mode (an IterableDataset): rows unknown in number, reached
        again through the stream's state."""

    def stamp(self) -> list:
        """What tells whether the part's rows may have changed, or where they are in it: a file's size and
        modification time (a directory's files'; a mirrored file's remote size and time or ETag), a
        dataset's fingerprint and cache files, the built-in corpus's Python version; streamed, also
        datasets' version, whose own format the stream's saved states are. Asked after :meth:`columns`."""
        if not self.streamed:
            return self._stamp()
        import datasets

        return [*self._stamp(), f"datasets {datasets.__version__}"]

    def _stamp(self) -> list:
        if self.builder == "builtin":
            return [self.where, sys.version]
        if self.builder == HF_BUILDER:
            return [self.where, hf_stamp(self.where) if self.streamed else hf_stamp(self.where, self._dataset)]
        if self.mirror is not None:  # a file, or a saved dataset's directory
            return [self.where, [[remote, stamp] for local, (remote, stamp) in sorted(self.mirror.remote.items())
                                 if local == self.path or self.path in local.parents]]
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        return [self.where, [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]]

    def __len__(self) -> int:
        """Rows: a text part's ``size``, a dataset's rows once loaded (by :meth:`columns`); 0 when streamed."""
        return self._size if self._dataset is None or self.streamed else self._dataset.num_rows

    def columns(self, text_column: str) -> list[str] | None:
        """The part's columns; None when it holds no rows."""
        if self._texts is not None:
            return [text_column]
        if self._load is not None and self._dataset is None:
            with _reading(self, text_column):
                self._dataset = self._load()
                self.streamed = not hasattr(self._dataset, "num_rows")
                names = self._dataset.column_names
                if names is None:  # a stream of JSON or CSV: its columns are those of its first row
                    first = next(iter(self._dataset), None)
                    names = None if first is None else list(first)
                self._columns = None if names is None else list(names)
        return self._columns

    def values(self, columns: list[str], text_column: str | None, start: int = 0,
               resume: str | None = None) -> Iterator[tuple[str | None, tuple]]:
        """Each row's values of ``columns`` from row ``start`` on, with (streamed) the stream's state before
        it, else None; ``resume`` is that state for row ``start``. A failure of datasets names the file
        (``text_column``: the column that must hold strings, for the message)."""
        if self._texts is not None:
            with _reading(self, text_column):
                texts = self._texts()
            for text in texts[start:]:
                yield None, (text,)
            return
        if self._dataset is None:
            return
        if self.streamed:
            yield from self._streamed(columns, text_column, start, resume)
            return
        with _reading(self, text_column):
            table = self._dataset.select_columns(columns)
            for lo in range(start, table.num_rows, _READ_BATCH):  # slices of a memory-mapped table: no read before start
                batch = table[lo:lo + _READ_BATCH]
                yield from ((None, row) for row in zip(*(batch[column] for column in columns)))

    def _streamed(self, columns: list[str], text_column: str | None, start: int,
                  resume: str | None) -> Iterator[tuple[str, tuple]]:
        """A streamed part's rows from ``start`` (reached through ``resume``, the stream's state there, else
        read through), each with the stream's state before it: datasets' own (``state_dict``), as JSON."""
        with _reading(self, text_column), quiet_datasets():
            stream = self._load()  # a fresh stream: its state is this reading's alone
            if resume is not None:
                stream.load_state_dict(json.loads(resume))
            examples = iter(stream)
            if resume is None:
                for _ in range(start):
                    next(examples, None)
            state = resume if resume is not None else json.dumps(stream.state_dict())
            for example in examples:
                yield state, tuple(example.get(column) for column in columns)
                state = json.dumps(stream.state_dict())


@contextlib.contextmanager
def _reading(part: _Part, text_column: str | None):
    """Any failure of datasets, loading or iterating, becomes one line naming the file and the cause
    (see :func:`softcache.corpus_errors.unreadable`)."""
    named = part.mirror.named if part.mirror is not None else str
    try:
        yield
    except SoftcacheError as err:
        if part.mirror is None:
            raise
        raise SoftcacheError(named(str(err))) from err
    except Exception as err:  # datasets raises many types (and wraps them) for unreadable input
        raise SoftcacheError(named(unreadable(part.path, part.builder, text_column, err))) from err


def _parts(data: str, split: str, streaming: bool) -> Iterator[_Part]:
    if data.startswith("builtin:"):
        if data not in BUILTIN_CORPORA:
            raise SoftcacheError(f"--data {data}: unknown built-in corpus; known: {', '.join(BUILTIN_CORPORA)}")
        if split not in BUILTIN_SPLITS:
            raise SoftcacheError(f"--split {split}: {data} has the splits {', '.join(BUILTIN_SPLITS)}")
        if data == "builtin:python-docs-chat":
            yield _Part(data, "builtin", load=lambda: _chat_rows(split))
        else:
            yield _Part(data, "builtin", texts=lambda: python_docs(split), size=len(python_docs(split)))
        return
    if data.startswith(HF_PREFIX):
        yield _Part(data, HF_BUILDER, load=lambda: load_hf(data, split, streaming))
        return
    if is_url(data):
        yield from _mirrored_parts(Mirrored(data), split, streaming)
        return
    path = Path(data)
    if not path.exists():
        raise SoftcacheError(f"--data {data} does not exist")
    if not path.is_file() and not path.is_dir():  # a pipe or a device: reading it would block or never end
        raise SoftcacheError(f"--data {data} is not a regular file or a directory")
    if is_saved_dataset(path):
        yield _Part(path, "saved dataset", load=lambda: _load_saved(path, split))
        return
    if path.is_dir():
        files = corpus_files(path, split)
    elif split != "train":
        raise SoftcacheError(f"--data {data} has no split {split!r} (splits: train); choose one with --split")
    else:
        files = [path]
    for file in files:
        yield _file_part(file, streaming)


def _mirrored_parts(mirror: Mirrored, split: str, streaming: bool) -> Iterator[_Part]:
    """The parts of an fsspec URL's local copy, read as the local file or directory would be."""
    root = mirror.root
    try:
        if is_saved_dataset(root):
            yield _Part(root, "saved dataset", load=lambda: _load_saved(root, split), mirror=mirror)
            return
        if root.is_dir():
            files = corpus_files(root, split)
        elif split != "train":
            raise SoftcacheError(f"--data {root} has no split {split!r} (splits: train); choose one with --split")
        else:
            files = [root]
    except SoftcacheError as err:
        raise SoftcacheError(mirror.named(str(err))) from err
    for file in files:
        yield _file_part(file, streaming, mirror)


def _file_part(path: Path, streaming: bool, mirror: Mirrored | None = None) -> _Part:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        shown = mirror.named(str(path)) if mirror is not None else path
        raise SoftcacheError(f"--data {shown}: unsupported file type {path.suffix or '(none)'}; "
                             f"use one of {', '.join(sorted(BUILDERS))} or a save_to_disk directory")
    if builder == "text":
        return _Part(path, builder, texts=lambda: [_read_text(path)], size=1, mirror=mirror)
    if builder in ("json", "csv") and _blank(path):
        return _Part(path, builder, mirror=mirror)  # no rows (datasets fails on such a file)
    options = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    return _Part(path, builder, load=lambda: _load(builder, data_files=str(path), split="train", streaming=streaming,
                                                   **options), mirror=mirror)


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


def _chat_rows(split: str):
    """The built-in chat corpus (softcache.chat_corpus) as a dataset of ``messages`` rows."""
    import datasets

    from softcache.chat_corpus import python_docs_chat

    return datasets.Dataset.from_list(python_docs_chat(split))


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
    with quiet_datasets():
        return datasets.load_dataset(builder, **options)
