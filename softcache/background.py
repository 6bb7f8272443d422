"""A background shard writer, so that the teacher never waits on the disk.

The teacher loop hands each batch's narrowed targets to :class:`BackgroundWriter` and goes on with
the next forward pass. A single thread copies the batch into its shard's host buffer (waiting on
the device-to-host copy first) and, once a shard is full, writes it through the
:class:`~softcache.store.StoreWriter`. The queue is bounded, so a slow disk slows the teacher
instead of filling memory; an error in the thread is raised in the teacher loop at the next submit.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from softcache.store import StoreWriter

_STOP = object()


class BackgroundWriter:
    """Context manager: ``submit`` batches in shard order; leaving the block flushes everything."""

    def __init__(self, writer: StoreWriter, max_batches: int = 4, on_shard=None):
        self.writer = writer
        self.on_shard = on_shard
        self._queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._filled: dict[int, int] = {}
        self._nll: dict[int, dict] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="softcache-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._put(_STOP)
        self._thread.join()
        if self._error is not None and exc is None:
            raise self._error

    def submit(self, shard: int, first: int, input_ids: np.ndarray, target_ids: torch.Tensor,
               target_logprobs: torch.Tensor, nll_sum: torch.Tensor, nll_count: int) -> None:
        """Queue one batch: rows starting at global sequence ``first`` of shard ``shard``.

        ``target_ids`` (int32), ``target_logprobs`` (float16) and ``nll_sum`` (0-d: the teacher's
        summed cross-entropy over ``nll_count`` labelled positions) may live on an accelerator: they
        are copied to pinned host memory without blocking, and the thread waits on that copy.
        """
        event = None
        if target_ids.device.type == "cuda":
            target_ids = _to_pinned(target_ids)
            target_logprobs = _to_pinned(target_logprobs)
            nll_sum = _to_pinned(nll_sum)
            event = torch.cuda.Event()
            event.record()
        self._put((shard, first, input_ids, target_ids, target_logprobs, nll_sum, nll_count, event))

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
            try:
                self._store(*item)
            except BaseException as err:  # surfaced in the teacher loop
                self._error = err

    def _store(self, shard, first, input_ids, target_ids, target_logprobs, nll_sum, nll_count, event) -> None:
        if event is not None:
            event.synchronize()
        layout = self.writer.layout
        shard_first, count = layout.shard_bounds(shard)
        if shard not in self._buffers:
            self._buffers[shard] = layout.empty_shard(count)
            self._filled[shard] = 0
            self._nll[shard] = {"sum": 0.0, "count": 0}
        buffer = self._buffers[shard]
        rows = slice(first - shard_first, first - shard_first + len(input_ids))
        buffer["input_ids"][rows] = input_ids
        buffer["target_ids"][rows] = target_ids.numpy()
        buffer["target_logprobs"][rows] = target_logprobs.numpy()
        self._filled[shard] += len(input_ids)
        self._nll[shard]["sum"] += float(nll_sum)
        self._nll[shard]["count"] += nll_count
        if self._filled[shard] == count:
            record = self.writer.write_shard(shard, self._buffers.pop(shard), teacher_nll=self._nll.pop(shard))
            del self._filled[shard]
            if self.on_shard is not None:
                self.on_shard(record)


def _to_pinned(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
