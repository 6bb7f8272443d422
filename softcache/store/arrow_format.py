"""Arrow IPC format: one uncompressed IPC file per shard, read zero-copy through a memory map.

Each file holds one record batch with one row per sequence and three fixed-size-list columns
(``input_ids`` of seq_len ids, ``target_ids`` and ``target_logprobs`` of seq_len * k entries).
Uncompressed IPC costs disk bytes but lets readers view the data in place with no decode step;
compressed IPC would decompress onto the heap, which is what the zarr format is for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from softcache.store.files import atomic_file
from softcache.store.layout import ARRAYS, Layout

SHARD_DIR = "shards"


def _schema(layout: Layout) -> pa.Schema:
    fields = []
    for name in ARRAYS:
        width = int(np.prod(layout.row_shape(name)))
        fields.append(pa.field(name, pa.list_(pa.from_numpy_dtype(layout.dtype(name)), width), nullable=False))
    return pa.schema(fields)


class ArrowFormat:
    name = "arrow"
    suffix = ".arrow"

    def __init__(self, codec: dict | None = None):
        if codec not in (None, {"name": "none"}):
            raise ValueError(f"the arrow format stores uncompressed IPC files, not {codec!r}")
        self.codec = {"name": "none"}

    def describe(self, layout: Layout) -> dict:
        return {"format": self.name, "codec": self.codec, "ipc": "one uncompressed record batch per shard file"}

    def prepare(self, root: Path, layout: Layout) -> None:
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def shard_files(self, layout: Layout, index: int) -> list[str]:
        return [f"{SHARD_DIR}/shard-{index:05d}.arrow"]

    def write_shard(self, root: Path, layout: Layout, index: int, arrays: dict[str, np.ndarray]) -> list[str]:
        """Write shard ``index`` durably (temporary name, fsync, rename) and return its files."""
        _, count = layout.shard_bounds(index)
        columns = [
            pa.FixedSizeListArray.from_arrays(pa.array(arrays[name].reshape(-1)), arrays[name][0].size)
            for name in ARRAYS
        ]
        batch = pa.record_batch(columns, schema=_schema(layout))
        assert batch.num_rows == count
        (relative,) = self.shard_files(layout, index)
        with atomic_file(root / relative) as handle:
            with pa.ipc.new_file(handle, batch.schema) as writer:
                writer.write_batch(batch)
        return [relative]

    def reader(self, root: Path, layout: Layout) -> ArrowReader:
        return ArrowReader(root, layout, self)


class ArrowReader:
    """Memory-maps shard files on first use; returned arrays are views of the mapped file."""

    def __init__(self, root: Path, layout: Layout, fmt: ArrowFormat):
        self.root = root
        self.layout = layout
        self.format = fmt
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def _open(self, index: int) -> dict[str, np.ndarray]:
        (relative,) = self.format.shard_files(self.layout, index)
        batch = pa.ipc.open_file(pa.memory_map(str(self.root / relative))).get_batch(0)
        views = {}
        for name in ARRAYS:
            flat = batch.column(name).values.to_numpy(zero_copy_only=True)
            views[name] = flat.reshape(batch.num_rows, *self.layout.row_shape(name))
        return views

    def read_rows(self, index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Global ``rows`` inside shard ``index`` (copied out of the mapped file)."""
        if index not in self._shards:
            self._shards[index] = self._open(index)
        first, _ = self.layout.shard_bounds(index)
        return {name: view[rows - first] for name, view in self._shards[index].items()}

    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) (global sequence numbers, inside shard ``index``), zero-copy views."""
        if index not in self._shards:
            self._shards[index] = self._open(index)
        first, _ = self.layout.shard_bounds(index)
        return {name: view[start - first : stop - first] for name, view in self._shards[index].items()}
