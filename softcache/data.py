"""Streaming a store into training: a deterministic order, a rank/worker partition, a small resume state.

The order of an epoch is a pure function of (shard sizes, seed, epoch): shards are visited in a
shuffled order, a few at a time (``window``), and the sequences of those shards are shuffled
together. Reads therefore stay within a few shards at once, at the cost of batches mixing only
``window`` shards. A global batch is ``batch_size x world_size`` consecutive entries of that order;
rank r takes its slice of every global batch. The last global batch of an epoch is padded with
masked-out rows, so every rank gets the same number of batches and every sequence is seen exactly
once per epoch; losses are normalised by the global count of valid tokens, so padding weighs nothing.

Batch ``c`` (counted from the start of training, across epochs) of a rank goes to DataLoader
worker ``c % num_workers``; PyTorch's loader takes batches from its workers in turn, so the stream
of batches is the same for any number of workers. The resume state is (seed, global batch size,
batches consumed): restoring it restores the exact order, also on another number of ranks with the
same global batch.

Because the order is known in advance, a reader of a store at a URL fetches the shards its next
batches read before it needs them (:func:`shard_spans`, softcache.store.prefetch), ``SOFTCACHE_PREFETCH``
shards ahead, while the student trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset

from softcache.distributed import environment
from softcache.store import open_store
from softcache.store.prefetch import Prefetcher
from softcache.store.remote import Remote
from softcache.store.transfer import RemoteSettings


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, window: int = 4) -> np.ndarray:
    """A permutation of range(sum(shard_sizes)) that keeps reads local to ``window`` shards at a time."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    shards = rng.permutation(len(shard_sizes))
    parts = []
    for group in range(0, len(shards), window):
        members = shards[group : group + window]
        indices = np.concatenate([starts[s] + np.arange(shard_sizes[s]) for s in members])
        parts.append(rng.permutation(indices))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shard_spans(order: np.ndarray, slots_of, batches: np.ndarray, first_batch: int, batch_size: int,
                world_size: int, rank: int) -> list[tuple[int, int, int]]:
    """The shards that ``rank`` reads in batches ``batches`` of an epoch (ascending batch numbers within
    the epoch ``order``, counted from ``first_batch``, the epoch's first global batch), as ``(first
    batch, last batch, shard)`` with global batch numbers, sorted by first batch (then shard).
    ``slots_of`` maps sequence numbers to shards (:meth:`softcache.store.Store.slots_of`)."""
    positions = (batches * batch_size * world_size + rank * batch_size)[:, None] + np.arange(batch_size)
    taken = positions < len(order)  # the rest are padding rows (the end of an epoch)
    if not taken.any():
        return []
    shards = slots_of(order[positions[taken]])
    steps = np.broadcast_to((batches + first_batch)[:, None], positions.shape)[taken]
    by_shard = np.lexsort((steps, shards))
    shards, steps = shards[by_shard], steps[by_shard]
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
    ends = np.r_[starts[1:], len(shards)] - 1
    return sorted(zip(steps[starts].tolist(), steps[ends].tolist(), shards[starts].tolist()))


def batches_per_epoch(num_sequences: int, global_batch: int) -> int:
    return -(-num_sequences // global_batch)


def rank_batch(order: np.ndarray, batch: int, batch_size: int, world_size: int, rank: int) -> np.ndarray:
    """Sequence indices of batch ``batch`` of ``rank``; -1 marks a padding row."""
    start = batch * batch_size * world_size + rank * batch_size
    rows = np.full(batch_size, -1, dtype=np.int64)
    taken = order[start : start + batch_size]
    rows[: len(taken)] = taken
    return rows


@dataclass
class ReaderState:
    """Everything needed to continue a stream of batches exactly where it stopped."""

    seed: int
    global_batch: int
    batches_consumed: int = 0
    """Global batches already trained on (optimiser steps x gradient-accumulation steps)."""

    def to_dict(self) -> dict:
        return asdict(self)


class StoreDataset(IterableDataset):
    """Batches of a store's sequences as torch tensors, for ``DataLoader(dataset, batch_size=None)``.

    Each item is a dict: ``input_ids`` [B, L] int64, ``target_ids`` [B, L, k] int64,
    ``target_logprobs`` [B, L, k] float32 (padded where a position has fewer than k entries: see
    softcache.store.encoding), ``target_mask`` [B, L, k] bool (the real entries), ``mask`` [B, L]
    bool (positions with a teacher target: not padding rows, and in a masked store only the positions
    that teach), ``labels`` [B, L] int64 (the true next token where ``mask`` is on, -100 elsewhere
    and at the last position of each sequence), ``step`` (0-d int64: the global batch number, for
    resuming) and ``epoch``. A documents store adds ``segments`` [B, L] int32 (document numbers:
    the student must see each document alone, softcache.packing.forward_documents).

    Args:
        store: path of a complete store.
        batch_size: sequences per batch on each rank.
        seed: shuffle seed.
        start, stop: use only sequences [start, stop) (e.g. to hold out the rest for evaluation).
        epochs: stop after this many epochs (None: never stop).
        start_batch: global batches to skip (from :class:`ReaderState`).
        window: shards shuffled together.
        shuffle: False reads in stored order (evaluation).
        allow_incomplete: read the finished shards of a store whose teacher job has not finished.
        verify_checksums: check each shard's files against their sha256 when first read (per worker).
    """

    def __init__(self, store: str, batch_size: int, seed: int = 0, start: int = 0, stop: int | None = None,
                 epochs: int | None = None, start_batch: int = 0, window: int = 4, shuffle: bool = True,
                 world_size: int | None = None, rank: int | None = None, allow_incomplete: bool = False,
                 verify_checksums: bool = True):
        super().__init__()
        self.path = str(store)
        self.allow_incomplete = allow_incomplete
        self.verify_checksums = verify_checksums
        opened = open_store(store, allow_incomplete=allow_incomplete)
        stop = len(opened) if stop is None else min(stop, len(opened))
        if not 0 <= start < stop:
            raise ValueError(f"empty sequence range [{start}, {stop}) of a store with {len(opened)} sequences")
        self.start = start
        self.num_sequences = stop - start
        self.shard_sizes = _clip([s.count for s in opened.shards], start, stop)
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.start_batch = start_batch
        self.window = window
        self.shuffle = shuffle
        self._world = (rank, world_size)
        self._store = None  # opened lazily, inside each DataLoader worker
        self._orders: dict[int, np.ndarray] = {}

    def partition(self) -> tuple[int, int, int, int]:
        rank, world, worker, workers = environment()
        if self._world[1] is not None:
            rank, world = self._world
        return rank, world, worker, workers

    def per_epoch(self, world_size: int) -> int:
        return batches_per_epoch(self.num_sequences, self.batch_size * world_size)

    def order(self, epoch: int) -> np.ndarray:
        """Store sequence numbers of epoch ``epoch``, in training order."""
        if not self.shuffle:
            return np.arange(self.start, self.start + self.num_sequences, dtype=np.int64)
        return self.start + epoch_order(self.shard_sizes, self.seed, epoch, self.window)

    def __iter__(self):
        rank, world, worker, workers = self.partition()
        per_epoch = self.per_epoch(world)
        step = self.start_batch
        ahead = self._prefetcher(rank, world, worker, workers)
        try:
            while self.epochs is None or step < self.epochs * per_epoch:
                if step % workers == worker:
                    epoch, batch = divmod(step, per_epoch)
                    rows = rank_batch(self._order(epoch), batch, self.batch_size, world, rank)
                    if ahead is not None:
                        ahead.advance(step)
                    yield {**self.read(rows), "step": torch.tensor(step), "epoch": torch.tensor(epoch)}
                step += 1
        finally:
            if ahead is not None:
                ahead.close()

    def _order(self, epoch: int) -> np.ndarray:
        """:meth:`order`, kept for the epoch being read and the one the prefetcher looks into."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e in (epoch - 1, epoch)}
            self._orders[epoch] = self.order(epoch)
        return self._orders[epoch]

    def _prefetcher(self, rank: int, world: int, worker: int, workers: int) -> Prefetcher | None:
        """For a store at a URL: fetches the shards this worker reads, in its order, ahead of need."""
        store = self._open()
        ahead = RemoteSettings.from_environment().prefetch
        if not isinstance(store.storage, Remote) or not ahead:
            return None
        return Prefetcher(store, self._spans(rank, world, worker, workers), ahead)

    def _spans(self, rank: int, world: int, worker: int, workers: int):
        """(first batch, last batch, shard) of every shard this worker reads from ``start_batch`` on."""
        per_epoch = self.per_epoch(world)
        epoch = self.start_batch // per_epoch
        while self.epochs is None or epoch < self.epochs:
            first = epoch * per_epoch
            steps = np.arange(max(first, self.start_batch), first + per_epoch)
            batches = steps[steps % workers == worker] - first
            yield from shard_spans(self._order(epoch), self._store.slots_of, batches, first, self.batch_size,
                                   world, rank)
            epoch += 1

    def _open(self):
        if self._store is None:
            self._store = open_store(self.path, allow_incomplete=self.allow_incomplete,
                                     verify_checksums=self.verify_checksums)
        return self._store

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors for sequence indices ``rows`` (-1: a padding row, all masked out)."""
        valid = rows >= 0
        arrays = self._open().read_rows(rows[valid])  # int64 ids, float32 values, gathered in one copy
        if not valid.all():  # padding rows (the end of an epoch): a point mass on id 0, masked out below
            padded = {name: np.zeros((len(rows), *a.shape[1:]), a.dtype) for name, a in arrays.items()}
            padded["target_logprobs"][..., 1:] = -np.inf
            for name, array in arrays.items():
                padded[name][valid] = array
            arrays = padded
        input_ids = arrays["input_ids"]
        mask = np.repeat(valid[:, None], input_ids.shape[1], axis=1)
        if "teach" in arrays:  # a masked store: only the positions that teach count, for KD and CE alike
            mask &= arrays["teach"]
        labels = np.full(input_ids.shape, -100, dtype=np.int64)
        labels[:, :-1] = np.where(mask[:, :-1], input_ids[:, 1:], -100)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "target_ids": torch.from_numpy(arrays["target_ids"]),
            "target_logprobs": torch.from_numpy(arrays["target_logprobs"]),
            "target_mask": torch.from_numpy(arrays["target_logprobs"] > -np.inf),
            "mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }
        if "segments" in arrays:
            batch["segments"] = torch.from_numpy(arrays["segments"])
        return batch


def _clip(sizes: list[int], start: int, stop: int) -> list[int]:
    """Sizes of the parts of consecutive shards that fall inside [start, stop)."""
    clipped, first = [], 0
    for size in sizes:
        take = min(first + size, stop) - max(first, start)
        if take > 0:
            clipped.append(take)
        first += size
    return clipped
