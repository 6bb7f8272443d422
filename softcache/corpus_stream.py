"""The teacher job's corpus, streamed: indexed in one pass, each shard's rows rebuilt when written.

The job never holds the packed corpus. One pass (rank 0) reads, tokenizes and packs ``--data`` with
the packers of the in-memory path (softcache.packers), keeping only the rows still open, and
records for every shard where in the input its first row starts (a :class:`Cursor`) and the sha256
of its rows; the corpus fingerprint is computed on the way. That index (:class:`CorpusIndex`, one
cursor per shard) goes to every rank and into each store's progress directory. A rank then
rebuilds only its own shards from their cursors (:meth:`StreamedCorpus.shard`), checks each against
its recorded digest, and the teacher reads it. Memory is the open rows and one shard, whatever the
corpus size.

Why one index pass rather than every rank reading what its shards need: where shard *s* starts
depends on the length of every document before it, so a rank cannot find its place without
reading all that came before; every rank reading everything would multiply the reading by the
number of ranks. The index pass reads the corpus once in all; each shard's rows are read a second
time by the one rank that writes them (a few documents more at its end), so the corpus is
tokenized twice in all, against teacher forward passes that cost thousands of times more.

A resumed job reads the saved index instead of the corpus when nothing that decides the rows has
changed (the settings, the tokenizer, and each input file's size and modification time): it then
tokenizes only the shards still to write. A rebuilt shard whose rows differ from their digest (a
file edited in place without a new size or time) is refused before the teacher sees it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from softcache.chat import InputShape
from softcache.corpus import CorpusRows
from softcache.corpus_documents import Recipe, RowCounts, pad_id, positioned_documents
from softcache.documents import (OPEN_ROWS, Counts, document_rows, fit, rows_fingerprint, stream_documents,
                                 stream_rows)
from softcache.errors import SoftcacheError
from softcache.mixture import Mixture
from softcache.packers import Place, Row, StreamPacker, WindowPacker, row_digest

INDEX_FILE = "progress/corpus-index.json"
"""Where a store being written keeps the index of its corpus (dropped with the progress records)."""
INDEX_SEAL = "index_sha256"
INDEX_VERSION = 2


@dataclass(frozen=True)
class Cursor:
    """Where a shard's first row starts in the input."""

    place: Place
    """The place of the document it starts in (softcache.corpus.CorpusRows.positioned): (file among
    ``--data``'s parts, row within it), with the stream's state there for a streamed file, or a mix's
    state (softcache.mixture)."""
    skip: int
    """Of that document: the tokens already in earlier rows (stream), or the pieces (``--long split``)."""
    open_rows: tuple[tuple[int, int], ...] = ()
    """Whole documents: the rows still open just before the shard's first row opened, with their fill."""


@dataclass
class Summary(Counts):
    """A streamed corpus's counts, with what a packed one computes from its rows."""

    num_sequences: int = 0
    seq_len: int = 0
    teaching_positions: int = 0
    fingerprint: str = ""


@dataclass
class CorpusIndex:
    """The streamed corpus: its counts, and each shard's cursor and row digest."""

    summary: Summary
    shard_size: int
    cursors: list[Cursor]
    digests: list[str]
    """sha256 of each shard's row digests (softcache.packers.row_digest) in row order."""
    key: dict = field(default_factory=dict)
    """What decides the rows (settings, tokenizer, input files' sizes and times): a saved index is
    reused only by a job with the same key."""

    def to_dict(self) -> dict:
        return {"version": INDEX_VERSION, "key": self.key, "summary": asdict(self.summary),
                "shard_size": self.shard_size, "digests": self.digests,
                "cursors": [[c.place, c.skip, c.open_rows] for c in self.cursors]}

    @classmethod
    def from_dict(cls, data: dict) -> CorpusIndex:
        """Raises ValueError (or KeyError, TypeError) for one that does not hold a cursor and a digest for
        each shard of its rows."""
        cursors = [Cursor(_place(place), int(skip), tuple((int(r), int(u)) for r, u in open_rows))
                   for place, skip, open_rows in data["cursors"]]
        index = cls(Summary(**data["summary"]), int(data["shard_size"]), cursors, list(data["digests"]), data["key"])
        shards = -(-index.summary.num_sequences // index.shard_size) if index.shard_size > 0 else -1
        if not (len(cursors) == len(index.digests) == shards > 0):
            raise ValueError(f"{len(cursors)} cursors and {len(index.digests)} digests for {shards} shards")
        return index


def _place(value) -> Place:
    """A place read back from JSON: its lists as tuples; integers, strings (a streamed part's state)
    and nulls (a mix's source not read yet) as they are."""
    if isinstance(value, list):
        return tuple(_place(item) for item in value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise TypeError(f"a place holds integers, strings and nulls, not {value!r}")
    return value


class _ShardDigests:
    """Row digests, arriving in any order, folded in row order into per-shard digests and the
    fingerprint (softcache.documents.PackedCorpus.fingerprint), holding only those that arrived early."""

    def __init__(self, shard_size: int, stream: bool):
        self.shard_size, self.stream = shard_size, stream
        self.waiting: dict[int, bytes] = {}
        self.next = 0
        self.shard = hashlib.sha256()
        self.digests: list[str] = []
        self.fingerprint = hashlib.sha256() if stream else rows_fingerprint()

    def add(self, number: int, row: Row) -> None:
        if self.stream:  # rows come in order; the fingerprint is the ids' own sha256, as stores have always had
            self.fingerprint.update(np.ascontiguousarray(row.ids, dtype="<u4").tobytes())
        self.waiting[number] = row_digest(row)
        while self.next in self.waiting:
            digest = self.waiting.pop(self.next)
            self.shard.update(digest)
            if not self.stream:
                self.fingerprint.update(digest)
            self.next += 1
            if self.next % self.shard_size == 0:
                self.digests.append(self.shard.hexdigest())
                self.shard = hashlib.sha256()

    def finish(self, rows: int) -> tuple[list[str], str]:
        assert not self.waiting and self.next == rows, "every row before the last one kept has closed"
        if rows % self.shard_size:
            self.digests.append(self.shard.hexdigest())
        return self.digests, self.fingerprint.hexdigest()


def index_corpus(rows: CorpusRows | Mixture, tokenizer, seq_len: int, shard_size: int, recipe: Recipe, *,
                 max_sequences: int | None = None, chat_template: str | None = None, skip_bad_rows: bool = False,
                 progress: bool = False, key: dict | None = None) -> CorpusIndex:
    """The one pass over ``rows`` (one corpus, or a mix of several): packed as ``recipe`` says (for one
    corpus, the rows exactly as softcache.corpus_documents.pack_rows makes them in memory), keeping
    the open rows only, with a cursor and a digest per shard of ``shard_size`` rows. Raises what
    packing raises (softcache.documents)."""
    summary = Summary(source=rows.source, seq_len=seq_len)
    cursors: dict[int, Cursor] = {}
    stream = recipe.packing == "stream"
    mixed = isinstance(rows, Mixture)
    counts = RowCounts()
    last: list = []
    if stream:
        def opened(row, where):
            if row % shard_size == 0:
                cursors[row // shard_size] = Cursor(*where)
    else:
        def opened(row, where, open_rows):
            if row % shard_size == 0:
                cursors[row // shard_size] = Cursor(*where, open_rows)
    if stream and not mixed:
        texts = ((place, text) for place, _, _, text in _bar(rows.positioned(), len(rows), "row", progress))
        produced = stream_rows(texts, tokenizer, seq_len, summary, max_sequences, on_open=opened)
    else:
        documents = positioned_documents(rows, tokenizer, recipe, chat_template, skip_bad_rows, counts,
                                         progress and recipe.shape != InputShape.TEXT and not mixed)
        if mixed:
            documents = _bar(_remember_last(documents, last), None, "document", progress)
        produced = (stream_documents(documents, seq_len, summary, max_sequences, on_open=opened) if stream else
                    document_rows(documents, seq_len, recipe.packing, recipe.long, pad_id(tokenizer), summary,
                                  max_sequences, on_open=opened))
    digests = _ShardDigests(shard_size, stream)
    teaching = 0
    for number, row in produced:
        digests.add(number, row)
        teaching += row.ids.size if row.teach is None else int(np.count_nonzero(row.teach))
    shard_digests, fingerprint = digests.finish(digests.next)
    if stream and not mixed:
        summary.rows_read = summary.documents + summary.empty_documents
    elif stream:
        summary.rows_read, summary.empty_documents = counts.rows, counts.empty
    else:
        for name, value in counts.of(rows.shape, recipe, tokenizer, chat_template).items():
            setattr(summary, name, value)
    if mixed:
        summary.mix = {"stop": rows.stop, "sources": rows.tally(last[0], len(last[1].ids))}
    summary.num_sequences, summary.teaching_positions, summary.fingerprint = digests.next, teaching, fingerprint
    return CorpusIndex(summary, shard_size, [cursors[i] for i in range(len(shard_digests))], shard_digests,
                       key or {})


def _remember_last(documents, last: list):
    """``documents`` passed on, ``last`` holding the latest (place, document)."""
    for item in documents:
        last[:] = item
        yield item


def _bar(iterator, total: int | None, unit: str, progress: bool):
    """``iterator`` with a bar of rows (documents) read on stderr, once reading takes a while."""
    from tqdm.auto import tqdm

    return tqdm(iterator, total=total, unit=unit, desc="reading corpus", disable=not progress, delay=2.0,
                file=sys.stderr, dynamic_ncols=True)


class StreamedCorpus:
    """The teacher job's corpus: the index, and each shard's rows rebuilt from ``rows`` when asked."""

    def __init__(self, index: CorpusIndex, rows: CorpusRows | Mixture, tokenizer, recipe: Recipe,
                 chat_template: str | None = None, skip_bad_rows: bool = False):
        self.index, self.rows, self.tokenizer, self.recipe = index, rows, tokenizer, recipe
        self.chat_template, self.skip_bad_rows = chat_template, skip_bad_rows

    @property
    def num_sequences(self) -> int:
        return self.index.summary.num_sequences

    @property
    def packing(self) -> str:
        return self.index.summary.packing

    def describe(self) -> dict:
        return self.index.summary.describe()

    def summary(self) -> str:
        return self.index.summary.summary()

    def shard(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The ids, teach mask and segments of the shard whose rows are ``first`` to ``first + count``,
        read again from the input and checked against the index."""
        number, size = divmod(first, self.index.shard_size)
        assert size == 0 and 0 < count <= self.index.shard_size, "a shard is rebuilt whole"
        cursor = self.index.cursors[number]
        made = self._stream(cursor, first, count) if self.packing == "stream" else self._documents(cursor, first, count)
        if len(made) != count or hashlib.sha256(b"".join(row_digest(r) for r in made)).hexdigest() != \
                self.index.digests[number]:
            raise SoftcacheError(f"--data {self.rows.source} changed since the job read it: shard {number}'s rows "
                                 "differ from the ones indexed (a file edited in place?); restore the data the store "
                                 "was started from, or write a new --out")
        ids = np.stack([r.ids for r in made])
        if self.packing == "stream":
            return ids, None, None
        return ids, np.stack([r.teach for r in made]), np.stack([r.segments for r in made])

    def _documents_from(self, cursor: Cursor):
        return positioned_documents(self.rows, self.tokenizer, self.recipe, self.chat_template, self.skip_bad_rows,
                                    RowCounts(), start=cursor.place)

    def _stream(self, cursor: Cursor, first: int, count: int) -> list[Row]:
        packer = StreamPacker(self.index.summary.seq_len, first_row=first)
        made: list[Row] = []
        skip = cursor.skip
        for place, document in self._documents_from(cursor):  # text: each document's tokens and EOS
            made.extend(row for _, row in packer.add(document.ids, place, skip))
            skip = 0
            if len(made) >= count:
                break
        return made[:count]

    def _documents(self, cursor: Cursor, first: int, count: int) -> list[Row]:
        seq_len, packing = self.index.summary.seq_len, self.packing
        packer = WindowPacker(seq_len, OPEN_ROWS if packing == "documents" else 1, pad_id(self.tokenizer),
                              close_each=packing == "none", keep=lambda row: first <= row < first + count,
                              first_row=first, open_rows=cursor.open_rows)
        made: dict[int, Row] = {}
        skip = cursor.skip
        for place, document in self._documents_from(cursor):
            pieces = fit(document, seq_len, self.recipe.long)
            for number in range(skip, len(pieces)):
                packer.place(pieces[number].ids, pieces[number].teach, (place, number))
            skip = 0
            made.update((n, content) for n, _, content in packer.take() if content is not None)
            if packer.frontier >= first + count:
                break
        else:
            packer.finish()
            made.update((n, content) for n, _, content in packer.take() if content is not None)
        return [made[n] for n in range(first, first + count) if n in made]


def corpus_key(settings: dict, rows: CorpusRows | Mixture, tokenizer_fingerprint: str) -> dict:
    """What decides a corpus's rows: the settings given, the tokenizer, and each part of ``rows``'s stamp
    (softcache.corpus: a file's size and modification time, a remote file's size and time or ETag, a Hugging
    Face dataset's fingerprint and cache files, the built-in corpus's Python version)."""
    key = {**settings, "tokenizer": tokenizer_fingerprint, "parts": [part.stamp() for part in rows.parts]}
    return json.loads(json.dumps(key))  # as it reads back from a saved index


def save_index(writer, index: CorpusIndex) -> None:
    """Keep ``index`` with the store ``writer`` is writing (sealed, compact JSON, written atomically;
    published with its progress records)."""
    from softcache.store.files import atomic_file
    from softcache.store.manifest import sealed

    path = writer.root / INDEX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as handle:
        handle.write(index_json(sealed(index.to_dict(), INDEX_SEAL)))
    writer.storage.upload(INDEX_FILE)


def index_json(data: dict) -> str:
    """A saved index as it is written: compact (one entry a shard; a million shards are its scale)."""
    return json.dumps(data, separators=(",", ":"))


def read_index(out: str, key: dict) -> CorpusIndex | None:
    """The index an unfinished store at ``out`` (a path or URL) kept, if it is intact and was made with
    ``key``; None otherwise (no store, a finished one, another corpus: the corpus is read again)."""
    from softcache.store.manifest import seal_problem
    from softcache.store.storage import open_storage

    try:
        path = open_storage(out).fetch(INDEX_FILE)
        data = json.loads(path.read_text())
        if seal_problem(data, INDEX_SEAL) is None and data.get("version") == INDEX_VERSION and data["key"] == key:
            return CorpusIndex.from_dict(data)
    except (SoftcacheError, OSError, ValueError, KeyError, TypeError):  # missing, unreadable or malformed
        return None
    return None
