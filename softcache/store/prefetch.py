"""Fetching a remote store's shards before the reader needs them, so a slow object store does not
stall the training step.

A training reader knows its whole future: the order of every epoch is a pure function of the seed
(softcache.data). It hands :class:`Prefetcher` the shards it will read as spans, ``(first, last,
slot)``: the first and last batch that read shard ``slot``, in order of ``first``. Before each batch
the reader calls :meth:`Prefetcher.advance`; the prefetcher then keeps ``ahead`` shards that are
not needed yet on their way into the mirror, on a pool of as many threads, and pins every shard
from the moment it is asked for until its last batch has been read, so that making room in a
mirror with a size limit never deletes it (softcache.store.mirror). The trade-off: ``ahead`` shards
of disk and up to ``ahead`` downloads at once, for reads that find their files already there.

A failed fetch ahead is dropped: the reader fetches the shard itself when it needs it, and reports
what fails then.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from softcache.store.reader import Store

MAX_THREADS = 16


@dataclass
class _Held:
    first: int
    last: int
    slot: int
    paths: list
    future: Future


class Prefetcher:
    """Fetches the shards of ``spans`` (``(first batch, last batch, slot)``, by first batch) into the
    mirror of ``store`` (a store at a URL) up to ``ahead`` shards before they are needed."""

    def __init__(self, store: Store, spans: Iterator[tuple[int, int, int]], ahead: int):
        self.store = store
        self.ahead = ahead
        self._spans = spans
        self._held: list[_Held] = []
        self._pool = ThreadPoolExecutor(max_workers=min(ahead, MAX_THREADS), thread_name_prefix="softcache-prefetch")

    def advance(self, batch: int) -> None:
        """The reader is about to read batch ``batch``: let go of the shards it has read for the last time
        and ask for more until ``ahead`` shards not needed yet are on their way (or there)."""
        mirror = self.store.storage.mirror
        for held in [h for h in self._held if h.last < batch]:
            mirror.unpin(held.paths)
        self._held = [h for h in self._held if h.last >= batch]
        while sum(h.first > batch for h in self._held) < self.ahead:
            span = next(self._spans, None)
            if span is None:
                break
            first, last, slot = span
            if last < batch:
                continue
            paths = self.store.shard_paths(slot)
            mirror.pin(paths)
            self._held.append(_Held(first, last, slot, paths, self._pool.submit(self._fetch, slot)))

    def _fetch(self, slot: int) -> None:
        try:
            self.store.fetch_shard(slot)
        except Exception:  # the reader fetches the shard again when it needs it, and reports the failure
            pass

    def close(self) -> None:
        """Stop: drop the fetches not started (those running end on their own) and every pin."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        mirror = self.store.storage.mirror
        for held in self._held:
            mirror.unpin(held.paths)
        self._held = []
