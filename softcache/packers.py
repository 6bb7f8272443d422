"""The packing policies as streams: documents in, finished rows out, in bounded memory.

softcache.documents describes the policies; this module runs them. Each packer takes documents one
at a time and hands out each row once it can no longer change, so the whole corpus never has to be
in memory: the in-memory packing (softcache.documents.pack and pack_documents), the index pass of a
streamed corpus and the replay of one shard (softcache.corpus_stream) all run these same packers.

Where a row starts in the input is reported as it opens (``on_open``): for a stream, the document
and the token within it; for whole documents, the document, the piece of it (``--long split``) and
the rows still open then with their fill. From that place a packer started again with those open
rows (their fill only, not their content) puts out exactly the rows it put out the first time,
which is what lets one shard be rebuilt alone.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Place = tuple
"""Where a document is in the input, as its source reports it, from which reading can start again: (part,
row within the part) for one corpus (softcache.corpus), each source's state for a mix (softcache.mixture)."""
Where = tuple[Place, int]
"""Where a row starts: a document's place, and the tokens (stream) or pieces (``--long split``) of it already used."""


@dataclass
class Row:
    """One packed row: ids, which targets teach, and the document number of each position."""

    ids: np.ndarray
    teach: np.ndarray | None = None
    segments: np.ndarray | None = None


def row_digest(row: Row) -> bytes:
    """sha256 of a row: its ids as little-endian uint32, then (documents packing) the teach mask as bytes
    and the segments as little-endian int32."""
    digest = hashlib.sha256(np.ascontiguousarray(row.ids, dtype="<u4").tobytes())
    if row.teach is not None:
        digest.update(np.ascontiguousarray(row.teach).view(np.uint8).tobytes())
        digest.update(np.ascontiguousarray(row.segments, dtype="<i4").tobytes())
    return digest.digest()


class StreamPacker:
    """``--packing stream``: tokens joined and cut every ``seq_len``; rows come out in order."""

    def __init__(self, seq_len: int, first_row: int = 0, on_open: Callable[[int, Where], None] | None = None):
        self.seq_len, self.row, self.on_open = seq_len, first_row, on_open
        self.buffer = np.empty(seq_len, dtype=np.uint32)
        self.filled = 0

    def add(self, tokens: np.ndarray, place: Place, skip: int = 0) -> list[tuple[int, Row]]:
        """Append one document's ``tokens`` (from its ``skip``-th on); the rows it completes."""
        done = []
        at = skip
        while at < len(tokens):
            if self.filled == 0 and self.on_open is not None:
                self.on_open(self.row, (place, at))
            take = min(self.seq_len - self.filled, len(tokens) - at)
            self.buffer[self.filled:self.filled + take] = tokens[at:at + take]
            self.filled += take
            at += take
            if self.filled == self.seq_len:
                done.append((self.row, Row(self.buffer.copy())))
                self.row, self.filled = self.row + 1, 0
        return done


class _Open:
    """A row being filled by whole documents."""

    def __init__(self, seq_len: int, pad_id: int):
        self.row = Row(np.full(seq_len, pad_id, np.uint32), np.zeros(seq_len, bool), np.zeros(seq_len, np.int32))
        self.documents = 0

    def place(self, lo: int, ids: np.ndarray, teach: np.ndarray) -> None:
        hi = lo + len(ids)
        self.row.ids[lo:hi], self.row.teach[lo:hi], self.row.segments[lo:hi] = ids, teach, self.documents
        self.documents += 1


class WindowPacker:
    """``--packing documents`` (first fit over ``window_size`` open rows) and ``none`` (``window_size`` 1,
    each row closed after one document); see softcache.documents.

    ``keep(row)`` says whose content to build (a replayed shard builds only its own rows; the others
    are tracked by fill alone). ``open_rows`` and ``first_row`` restart the packer where a cursor says.
    Closed rows collect in :attr:`closed` as (row, fill, content or None) until taken.
    """

    def __init__(self, seq_len: int, window_size: int, pad_id: int, close_each: bool = False,
                 keep: Callable[[int], bool] = lambda row: True, first_row: int = 0,
                 open_rows: tuple[tuple[int, int], ...] = (),
                 on_open: Callable[[int, Where, tuple[tuple[int, int], ...]], None] | None = None):
        self.seq_len, self.window_size, self.pad_id, self.close_each = seq_len, window_size, pad_id, close_each
        self.keep, self.next_row, self.on_open = keep, first_row, on_open
        self.window: deque[int] = deque(row for row, _ in open_rows)
        self.used: dict[int, int] = dict(open_rows)
        self.content: dict[int, _Open] = {}
        self.closed: list[tuple[int, int, Row | None]] = []

    def place(self, ids: np.ndarray, teach: np.ndarray, where: Where) -> None:
        """Put one piece (at most ``seq_len`` tokens) into the oldest open row with room, else a new row."""
        row = next((r for r in self.window if self.used[r] + len(ids) <= self.seq_len), None)
        if row is None:
            if self.on_open is not None:
                self.on_open(self.next_row, where, tuple((r, self.used[r]) for r in self.window))
            row, self.next_row = self.next_row, self.next_row + 1
            self.used[row] = 0
            if self.keep(row):
                self.content[row] = _Open(self.seq_len, self.pad_id)
            self.window.append(row)
            if len(self.window) > self.window_size:
                self._close(self.window.popleft())
        if row in self.content:
            self.content[row].place(self.used[row], ids, teach)
        self.used[row] += len(ids)
        if self.close_each or self.seq_len - self.used[row] < 2:  # a piece that teaches has 2 tokens or more
            self.window.remove(row)
            self._close(row)

    @property
    def frontier(self) -> int:
        """Every row before this one is closed."""
        return self.window[0] if self.window else self.next_row

    def finish(self) -> None:
        """Close every open row (the input has ended)."""
        while self.window:
            self._close(self.window.popleft())

    def take(self) -> list[tuple[int, int, Row | None]]:
        closed, self.closed = self.closed, []
        return closed

    def _close(self, row: int) -> None:
        """Number the row's padding (one segment after its last document) and hand it out."""
        used = self.used.pop(row)
        opened = self.content.pop(row, None)
        if opened is not None:
            opened.row.segments[used:] = opened.documents
        self.closed.append((row, used, None if opened is None else opened.row))
