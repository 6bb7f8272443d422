"""A background shard writer, so that the teacher never waits on encoding or the disk.

The teacher loop hands each batch's targets to :class:`BackgroundWriter` and goes on with the
next forward pass. A single thread copies the batch to the host (waiting on the device-to-host
copy first), encodes it into the store's columns and, once a shard is complete, writes it through
the :class:`~softcache.store.StoreWriter`. The queue is bounded, so a slow disk slows the teacher
instead of filling memory; an error in the thread is raised in the teacher loop at the next submit.
"""

from __future__ import annotations

import math
import queue
import threading
import time

import numpy as np
import torch

from softcache.errors import SoftcacheError
from softcache.store import StoreWriter
from softcache.store.encoding import concat, encode

_STOP = object()


class BackgroundWriter:
    """Context manager: ``submit`` batches in shard order; leaving the block flushes everything."""

    def __init__(self, writer: StoreWriter, max_batches: int = 4, on_shard=None):
        self.writer = writer
        self.on_shard = on_shard
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._parts: dict[int, list[tuple[int, dict]]] = {}
        self._filled: dict[int, int] = {}
        self._nll: dict[int, dict] = {}
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0
        """CPU seconds the writer's thread has spent on batches (host copies, encoding, shard writes)."""
        self._thread = threading.Thread(target=self._run, name="softcache-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._put(_STOP)
        self._thread.join()
        if self._error is not None and exc is None:
            raise self._error

    def submit(self, shard: int, first: int, input_ids: np.ndarray, targets: dict[str, torch.Tensor | None],
               nll_sum: torch.Tensor, nll_count: int) -> None:
        """Queue one batch: rows starting at global sequence ``first`` of shard ``shard``.

        ``targets`` holds the arguments of :func:`softcache.store.encoding.encode` as tensors
        (``ids``, ``values``, ``lengths``; None where absent); with ``nll_sum`` (0-d: the teacher's
        summed cross-entropy over ``nll_count`` labelled positions) they may live on an accelerator:
        they are copied to pinned host memory without blocking, and the thread waits on that copy.
        """
        event = None
        on_gpu = [t.device for t in targets.values() if t is not None and t.device.type == "cuda"]
        if on_gpu:
            targets = {name: None if t is None else _to_pinned(t) for name, t in targets.items()}
            nll_sum = _to_pinned(nll_sum)
            event = torch.cuda.Event()
            # On the copies' own GPU's stream: not the current device's when a rank's teacher is not on
            # cuda:0, or a placed teacher's head is on another GPU.
            event.record(torch.cuda.current_stream(on_gpu[0]))
        self._put((shard, first, input_ids, targets, nll_sum, nll_count, event))

    def _put(self, item) -> None:
        while True:
            if self._error is not None and item is not _STOP:
                raise self._error
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError("the background writer stopped") from self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None:
                continue  # drain so the teacher loop is never blocked
            started = time.thread_time()
            try:
                self._store(*item)
            except BaseException as err:  # surfaced in the teacher loop
                self._error = err
            self.cpu_seconds += time.thread_time() - started

    def _store(self, shard, first, input_ids, targets, nll_sum, nll_count, event) -> None:
        if event is not None:
            event.synchronize()
        nll_value = float(nll_sum)
        if math.isnan(nll_value):  # the sum over the batch's labelled positions: any NaN row makes it NaN
            raise SoftcacheError(
                f"the teacher's logits are NaN in sequences {first:,} to {first + len(input_ids) - 1:,}: their targets "
                f"would be meaningless (sampled draws still look valid), so shard {shard} is not written; a float16 "
                "teacher can overflow: rerun with --dtype bfloat16 or float32 (the shards already written are kept)")
        _, count = self.writer.layout.shard_bounds(shard)
        arrays = {name: None if t is None else t.numpy() for name, t in targets.items()}
        part = encode(self.writer.encoding, input_ids, **arrays)
        self._parts.setdefault(shard, []).append((first, part))
        self._filled[shard] = self._filled.get(shard, 0) + len(input_ids)
        nll = self._nll.setdefault(shard, {"sum": 0.0, "count": 0})
        nll["sum"] += nll_value
        nll["count"] += nll_count
        if self._filled[shard] == count:
            columns = concat([p for _, p in sorted(self._parts.pop(shard), key=lambda item: item[0])])
            record = self.writer.write_shard(shard, columns, teacher_nll=self._nll.pop(shard))
            del self._filled[shard]
            if self.on_shard is not None:
                self.on_shard(record)


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
