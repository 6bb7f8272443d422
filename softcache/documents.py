"""Documents into fixed-length rows: the packing policies, and what happens to a long document.

A document is one text (its tokens and EOS) or one rendered conversation: token ids and, per
position, whether the target cached there teaches (:class:`Document`). The teacher runs on rows of
``seq_len`` tokens, so each policy trades padding (teacher time spent on nothing) against documents
seeing each other:

- ``stream`` (:func:`pack`; text only): the documents joined with EOS and cut every ``seq_len``
  tokens. No padding and every position teaches, but attention crosses documents and a document may
  be cut across two rows: right for plain text, where what came before is more text. Its output is
  the one stores have always been written from (their corpus fingerprints depend on it).
- ``documents``: whole documents, several per row, each alone in attention (``segments`` number
  them; softcache.packing turns them into the mask and position ids), the rest of a row padding
  that never teaches. Greedy first-fit over at most :data:`OPEN_ROWS` open rows: a document goes
  into the oldest open row with room, else opens a row; opening one more than OPEN_ROWS closes the
  oldest, and a full row closes at once. Deterministic, memory bounded by the rows themselves, rows
  in the order of their first document and each row's documents in corpus order. Measured with
  SmolLM2's template at seq_len 1024, padding with 1 / 8 / 32 / 64 open rows: 13.6 / 7.2 / 5.2 /
  5.2% on the conversations of the built-in chat corpus (median 278 tokens), 6.9 / 1.8 / 1.8 /
  1.8% on 2,608 shorter ones (median 89); at seq_len 512, 34 / 25 / 23.2 / 22.5% on the first.
- ``none``: one document per row: the most padding (73% and 90% on those conversations at 1024),
  nothing shared.

A document longer than ``seq_len`` (:data:`LONG`) is truncated to its first ``seq_len`` tokens (a
causal model's targets on a prefix are those of the whole document), split into consecutive pieces
of at most ``seq_len`` tokens, each a document of its own (a later piece loses what came before
it), or dropped. The last position of a cut piece has its target outside the piece, so it does not
teach; a piece in which nothing teaches is left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from softcache.errors import SoftcacheError
from softcache.packers import Place, Row, StreamPacker, WindowPacker, row_digest

PACKINGS = {
    "stream": "join the documents with EOS and cut every --seq-len tokens (text only; attention crosses documents)",
    "documents": "several whole documents per row, each alone in attention, the rest of the row padding",
    "none": "one document per row, the rest padding",
}
LONG = {
    "truncate": "keep its first --seq-len tokens",
    "split": "cut it into consecutive pieces of at most --seq-len tokens, each packed as a document",
    "drop": "leave it out",
}
_LONG_COUNTS = {"truncate": "long_truncated", "split": "long_split", "drop": "long_dropped"}
OPEN_ROWS = 32
"""Rows that ``documents`` packing keeps open for a document to fit into (see the module docstring)."""
TOKENIZE_BATCH = 512  # documents per fast-tokenizer call
_BLOCK_TOKENS = 1 << 22  # rows are allocated this many positions at a time


@dataclass(frozen=True)
class Document:
    """One document's tokens, before packing."""

    ids: np.ndarray
    """[T] uint32 token ids."""
    teach: np.ndarray
    """[T] bool: the target cached at position t (the teacher's distribution of token t + 1) teaches."""

    @classmethod
    def text(cls, ids, eos: int) -> Document:
        """A text's ``ids`` followed by ``eos``; every position but the last (no next token) teaches."""
        tokens = with_eos(ids, eos)
        teach = np.ones(len(tokens), dtype=bool)
        teach[-1] = False
        return cls(tokens, teach)


@dataclass
class Counts:
    """What reading and packing a corpus did: the manifest's corpus section and the job's summary line,
    shared by a corpus packed in memory (:class:`PackedCorpus`) and one streamed
    (softcache.corpus_stream), which provide ``num_sequences``, ``seq_len``, ``teaching_positions``
    and ``fingerprint``."""

    source: str = ""
    documents: int = 0
    """Documents tokenized or rendered (reading stops once ``max_sequences`` rows are complete)."""
    tokens_read: int = 0
    """Tokens of those documents (stream: EOS separators included)."""
    dropped_tokens: int = 0
    """Tokens read but in no sequence: the incomplete tail (stream), cut or dropped long documents, and
    anything past ``max_sequences``."""
    empty_documents: int = 0
    """Documents skipped because they hold no text (empty, whitespace only, or a missing value)."""
    input_shape: str = "text"
    chat_template_sha256: str | None = None
    """sha256 of the chat template the rows were rendered with (UTF-8); None for text or no template."""
    train_on: str = "all"
    packing: str = "stream"
    long: str = "split"
    rows_read: int = 0
    """Rows of ``--data`` read, bad and empty ones included."""
    bad_rows: int = 0
    """Rows skipped as unusable (``--skip-bad-rows``)."""
    first_bad_row: str | None = None
    """The first of them: ``--data FILE: row N, column ...: why``."""
    long_truncated: int = 0
    """Documents longer than seq_len cut to their first seq_len tokens (``--long truncate``)."""
    long_split: int = 0
    """Documents longer than seq_len packed as consecutive pieces (``--long split``)."""
    long_dropped: int = 0
    """Documents longer than seq_len left out: by ``--long drop``, or because no piece of them teaches."""
    padding_positions: int = 0
    """Positions of the rows that hold no document (they never teach)."""
    mix: dict | None = None
    """Several corpora mixed (softcache.mixture): ``stop`` (``--mix-stop``) and, per source, its ``data``,
    ``weight``, and the ``documents`` and ``tokens`` read from it, their ``share`` of all tokens and its
    ``restarts``; None for one corpus."""

    def describe(self) -> dict:
        """The manifest's corpus description: five keys for a stream, and how rows were made otherwise;
        a mix adds what it took from each corpus."""
        described = {"source": self.source, "documents": self.documents, "tokens_read": self.tokens_read,
                     "dropped_tokens": self.dropped_tokens, "fingerprint": self.fingerprint}
        if self.mix is not None:
            described["mix"] = self.mix
        if self.packing == "stream":
            return described
        return {**described, "input_shape": self.input_shape, "chat_template_sha256": self.chat_template_sha256,
                "train_on": self.train_on, "packing": self.packing, "long": self.long, "bad_rows": self.bad_rows,
                "long_truncated": self.long_truncated, "long_split": self.long_split,
                "long_dropped": self.long_dropped, "teaching_positions": self.teaching_positions,
                "padding_positions": self.padding_positions}

    def summary(self) -> str:
        """One line: what was read, skipped and cut, and how many rows came out."""
        rows, length = self.num_sequences, self.seq_len
        empty = f", {self.empty_documents:,} empty ones skipped" if self.empty_documents else ""
        if self.mix is not None:  # said of the documents, like the empty ones
            shares = ", ".join(f"{source['share']:.1%} from {source['data']}"
                               f"{' (repeated)' if source['restarts'] else ''}" for source in self.mix["sources"])
            empty += f" (tokens: {shares})"
        if self.packing == "stream":
            return (f"{self.documents:,} documents{empty}, {rows:,} sequences of {length} tokens "
                    f"({self.dropped_tokens:,} trailing tokens dropped)")
        long = [f"{n:,} {what}" for n, what in ((self.long_truncated, "truncated"), (self.long_split, "split"),
                                                (self.long_dropped, "dropped")) if n]
        longer = f"; longer than {length} tokens: {', '.join(long)}" if long else ""
        bad = f"; {self.bad_rows:,} bad rows skipped, the first: {self.first_bad_row}" if self.bad_rows else ""
        size = rows * length
        return (f"{self.input_shape} rows, {self.documents:,} documents{empty}{longer}; {rows:,} rows of {length} "
                f"tokens (--packing {self.packing}), {self.teaching_positions / size:.1%} of positions teach "
                f"(--train-on {self.train_on}), {self.padding_positions / size:.1%} padding{bad}")


@dataclass
class PackedCorpus(Counts):
    """A corpus packed in memory: the rows and what was done to get them."""

    input_ids: np.ndarray | None = None
    """[num_sequences, seq_len] uint32 token ids."""
    teach: np.ndarray | None = None
    """[num_sequences, seq_len] bool: the target at a position teaches; None (stream): every position."""
    segments: np.ndarray | None = None
    """[num_sequences, seq_len] int32: the document number within its row (0, 0, 1, 1, 1, 2, ...); the
    padding after the last document is one more segment. None (stream): one stream, no segments."""

    @property
    def num_sequences(self) -> int:
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def teaching_positions(self) -> int:
        """Positions whose target teaches (a stream, whose ``teach`` is None: every position)."""
        return int(self.input_ids.size if self.teach is None else np.count_nonzero(self.teach))

    @property
    def fingerprint(self) -> str:
        """Equal rows, equal fingerprint: for a stream, sha256 of the ids as little-endian uint32 (as stores
        have always recorded); for whole documents, sha256 of each row's digest in row order
        (softcache.packers.row_digest: ids, teach mask and segments), which a streamed corpus computes
        as rows close."""
        if self.teach is None:
            return hashlib.sha256(np.ascontiguousarray(self.input_ids, dtype="<u4").tobytes()).hexdigest()
        return rows_fingerprint(row_digest(row) for row in self.rows(0, self.num_sequences)).hexdigest()

    def rows(self, first: int, count: int) -> Iterator[Row]:
        """Rows ``first`` to ``first + count`` (softcache.packers.Row)."""
        for index in range(first, first + count):
            yield Row(self.input_ids[index], None if self.teach is None else self.teach[index],
                      None if self.segments is None else self.segments[index])

    def shard(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The ids, teach mask and segments of rows ``first`` to ``first + count`` (what the teacher reads)."""
        cut = slice(first, first + count)
        return (self.input_ids[cut], None if self.teach is None else self.teach[cut],
                None if self.segments is None else self.segments[cut])


def rows_fingerprint(digests: Iterable[bytes] = ()):
    """The fingerprint of whole-document rows as a hash object, fed their digests in row order (a streamed
    corpus goes on feeding it as rows close); ``hexdigest()`` is the fingerprint."""
    fingerprint = hashlib.sha256(b"rows")
    for digest in digests:
        fingerprint.update(digest)
    return fingerprint


def pack(documents: Iterator[str], tokenizer, seq_len: int, max_sequences: int | None = None,
         source: str = "") -> PackedCorpus:
    """``--packing stream`` in memory: :func:`stream_rows` over ``documents``, the rows stacked."""
    counts = Counts(source=source)
    rows = [row.ids for _, row in stream_rows((((0, i), text) for i, text in enumerate(documents)), tokenizer,
                                              seq_len, counts, max_sequences)]
    return PackedCorpus(**vars(counts), input_ids=np.stack(rows))


def stream_rows(texts: Iterable[tuple[Place, str]], tokenizer, seq_len: int, counts: Counts,
                max_sequences: int | None = None, on_open=None) -> Iterator[tuple[int, Row]]:
    """``--packing stream``: tokenize ``texts`` (each with its place, softcache.packers.Place) in batches,
    join them with EOS and cut the stream into rows, yielded in order as (number, row); the incomplete
    tail is dropped. ``counts`` is filled in as the texts are read; ``on_open``
    (softcache.packers.StreamPacker) hears where each row starts.

    A document that is empty or only whitespace is skipped (counted in ``empty_documents``): it
    would add an EOS with nothing before it. Stops reading once ``max_sequences`` full sequences
    exist. Raises :class:`SoftcacheError` when the tokenizer has no EOS token, no document holds
    text, or the corpus is too short for a single sequence; ``counts.source`` (the ``--data`` value)
    names the corpus in those messages.
    """
    eos = text_eos(tokenizer)

    def empty() -> None:
        counts.empty_documents += 1

    batches = ([(place, with_eos(ids, eos)) for place, ids in batch]
               for batch in tokenized_texts(texts, tokenizer, empty))
    return _stream(batches, seq_len, counts, max_sequences, on_open)


def stream_documents(documents: Iterable[tuple[Place, Document]], seq_len: int, counts: Counts,
                     max_sequences: int | None = None, on_open=None) -> Iterator[tuple[int, Row]]:
    """``--packing stream`` of documents already tokenized (their ids, EOS included), as :func:`stream_rows`
    packs texts; reading stops at the first document past ``max_sequences`` rows."""
    return _stream(([(place, document.ids)] for place, document in documents), seq_len, counts, max_sequences,
                   on_open)


def text_eos(tokenizer) -> int:
    """The id that ends each text document: the tokenizer's EOS; raises :class:`SoftcacheError` without one."""
    if tokenizer.eos_token_id is None:
        raise SoftcacheError("the teacher's tokenizer has no EOS token, which packing needs to end text documents")
    return tokenizer.eos_token_id


def tokenized_texts(texts: Iterable[tuple[Place, str]], tokenizer, on_empty: Callable[[], None],
                    first: int = TOKENIZE_BATCH, most: int = TOKENIZE_BATCH
                    ) -> Iterator[list[tuple[Place, list[int]]]]:
    """The texts that hold some (``on_empty()`` is told of each other one), each with its place,
    tokenized without special tokens in batches of ``first`` texts, doubling up to ``most`` (a shard
    rebuilt from a cursor reads only a little past its end): lists of (place, ids)."""
    batch: list[str] = []
    places: list[Place] = []
    size = first
    for place, text in texts:
        if not text or text.isspace():
            on_empty()
            continue
        batch.append(text)
        places.append(place)
        if len(batch) == size:
            yield _encoded(tokenizer, batch, places)
            batch, places, size = [], [], min(2 * size, most)
    if batch:
        yield _encoded(tokenizer, batch, places)


def _encoded(tokenizer, batch: list[str], places: list[Place]) -> list[tuple[Place, list[int]]]:
    return list(zip(places, tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]))


def with_eos(ids, eos: int) -> np.ndarray:
    """A text's token ``ids`` followed by ``eos``, as uint32: the document a text becomes."""
    tokens = np.empty(len(ids) + 1, dtype=np.uint32)
    tokens[:-1], tokens[-1] = ids, eos
    return tokens


def _stream(batches: Iterable[list[tuple[Place, np.ndarray]]], seq_len: int, counts: Counts,
            max_sequences: int | None, on_open) -> Iterator[tuple[int, Row]]:
    """The stream packing of batches of documents' ids (see :func:`stream_rows`): every batch is packed
    whole, and none is read once ``max_sequences`` rows are full."""
    limit = None if max_sequences is None else max_sequences * seq_len
    packer = StreamPacker(seq_len, on_open=on_open)
    total = 0
    for batch in batches:
        for place, ids in batch:
            counts.documents += 1
            total += len(ids)
            yield from ((number, row) for number, row in packer.add(ids, place)
                        if max_sequences is None or number < max_sequences)
        if limit is not None and total >= limit:
            break
    corpus = f"--data {counts.source}" if counts.source else "the corpus"
    if not counts.documents:
        raise SoftcacheError(f"{corpus} has no text to cache: {no_text(counts.empty_documents)}")
    n_seq = total // seq_len if max_sequences is None else min(total // seq_len, max_sequences)
    if n_seq == 0:
        raise SoftcacheError(
            f"{corpus} has {total} tokens, fewer than one sequence of "
            f"--seq-len {seq_len}; give more text or a smaller --seq-len"
        )
    counts.tokens_read, counts.dropped_tokens = total, total - n_seq * seq_len


def no_text(empty: int) -> str:
    """Why a corpus has no text, given how many empty documents it had."""
    if not empty:
        return "it holds no documents"
    if empty == 1:
        return "its one document is empty or whitespace"
    return f"its {empty:,} documents are all empty or whitespace"


def fit(document: Document, seq_len: int, long: str) -> list[Document]:
    """The pieces of ``document`` to pack under ``--long long``: itself when it fits in ``seq_len``
    tokens; else its first ``seq_len`` tokens (truncate), its consecutive pieces (split) or nothing
    (drop). A cut piece's last position does not teach (its target lies outside the piece), and a
    piece in which nothing teaches is left out."""
    length = len(document.ids)
    if length <= seq_len:
        return [document]
    if long not in LONG:
        raise ValueError(f"long must be one of {', '.join(LONG)}, not {long!r}")
    starts = [] if long == "drop" else [0] if long == "truncate" else range(0, length, seq_len)
    pieces = []
    for start in starts:
        teach = document.teach[start:start + seq_len].copy()
        teach[-1] = False
        if teach.any():
            pieces.append(Document(document.ids[start:start + seq_len], teach))
    return pieces


class _Blocks:
    """[rows, seq_len] ids, teach and segments, allocated a block of rows at a time and filled as rows
    close (in any order), so memory stays near the rows' own bytes (no copy of everything when they
    grow; peak RSS 1.33x those bytes packing 18M tokens)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.per_block = max(1, _BLOCK_TOKENS // seq_len)
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def put(self, number: int, row: Row) -> None:
        block, at = divmod(number, self.per_block)
        while len(self.blocks) <= block:
            shape = (self.per_block, self.seq_len)
            self.blocks.append((np.empty(shape, np.uint32), np.empty(shape, bool), np.empty(shape, np.int32)))
        for target, source in zip(self.blocks[block], (row.ids, row.teach, row.segments)):
            target[at] = source

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``count`` rows as three arrays, freeing each block once copied."""
        out = (np.empty((count, self.seq_len), np.uint32), np.empty((count, self.seq_len), bool),
               np.empty((count, self.seq_len), np.int32))
        for start in range(0, count, self.per_block):
            block = self.blocks.pop(0)
            stop = min(start + self.per_block, count)
            for target, source in zip(out, block):
                target[start:stop] = source[:stop - start]
        self.blocks.clear()
        return out


def pack_documents(documents: Iterable[Document], seq_len: int, packing: str, long: str, pad_id: int,
                   max_sequences: int | None = None, source: str = "") -> PackedCorpus:
    """``--packing documents`` or ``none`` in memory: :func:`document_rows` over ``documents``, the rows
    gathered in row order."""
    counts = Counts(source=source)
    blocks = _Blocks(seq_len)
    kept = 0
    for number, row in document_rows((((0, i), document) for i, document in enumerate(documents)), seq_len,
                                     packing, long, pad_id, counts, max_sequences):
        blocks.put(number, row)
        kept += 1
    ids, teach, segments = blocks.take(kept)
    return PackedCorpus(**vars(counts), input_ids=ids, teach=teach, segments=segments)


def document_rows(documents: Iterable[tuple[Place, Document]], seq_len: int, packing: str, long: str,
                  pad_id: int, counts: Counts, max_sequences: int | None = None,
                  on_open=None) -> Iterator[tuple[int, Row]]:
    """``--packing documents`` or ``none``: each document (with its place, softcache.packers.Place), cut or dropped by
    :func:`fit` when longer than ``seq_len``, placed whole into a row padded with ``pad_id`` (see the
    module docstring); rows yielded as (number, row) as they close, not in order. ``counts`` is
    filled in as documents are read; ``on_open`` (softcache.packers.WindowPacker) hears where each
    row starts.

    Stops reading once ``max_sequences`` rows are complete. Raises :class:`SoftcacheError` naming
    ``--data counts.source`` when no row comes out or nothing in them teaches.
    """
    if packing not in ("documents", "none"):
        raise ValueError(f"document_rows packs documents or none, not {packing!r}")
    packer = WindowPacker(seq_len, OPEN_ROWS if packing == "documents" else 1, pad_id,
                          close_each=packing == "none", on_open=on_open)
    filled = teaching = 0

    def closed() -> Iterator[tuple[int, Row]]:
        nonlocal filled, teaching
        for number, used, row in packer.take():
            if max_sequences is None or number < max_sequences:
                filled += used
                teaching += int(np.count_nonzero(row.teach))
                yield number, row

    for place, document in documents:
        counts.documents += 1
        counts.tokens_read += len(document.ids)
        pieces = fit(document, seq_len, long)
        if len(document.ids) > seq_len:
            which = _LONG_COUNTS[long if pieces else "drop"]
            setattr(counts, which, getattr(counts, which) + 1)
        for number, piece in enumerate(pieces):
            packer.place(piece.ids, piece.teach, (place, number))
        yield from closed()
        if max_sequences is not None and packer.frontier >= max_sequences:
            break  # every row before max_sequences is complete
    packer.finish()
    yield from closed()
    kept = packer.next_row if max_sequences is None else min(packer.next_row, max_sequences)
    corpus = f"--data {counts.source}" if counts.source else "the corpus"
    if not counts.documents:
        raise SoftcacheError(f"{corpus} has no documents to cache")
    if not kept:
        raise SoftcacheError(f"{corpus} gives no row to cache: its {counts.documents:,} documents are all longer "
                             f"than --seq-len {seq_len} and --long {long} leaves nothing of them that teaches")
    if not teaching:
        raise SoftcacheError(f"nothing in {corpus} teaches: no position of its {kept:,} rows has a target to learn")
    counts.packing, counts.long = packing, long
    counts.dropped_tokens = counts.tokens_read - filled
    counts.padding_positions = kept * seq_len - filled
