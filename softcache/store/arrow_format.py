"""Arrow IPC format: one uncompressed IPC file per shard, read zero-copy through a memory map.

Each file holds one record batch with one row per sequence: the fixed columns as fixed-size lists of
seq_len values, the ragged ones as large lists (each sequence's entries). Uncompressed IPC costs
disk bytes but lets readers view the data in place with no decode step; compressed IPC would
decompress onto the heap, which is what the zarr format is for.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pyarrow as pa

from softcache.errors import StoreError
from softcache.store.consistency import loaded_columns
from softcache.store.encoding import Encoding, Ragged
from softcache.store.files import atomic_file
from softcache.store.layout import Layout

SHARD_DIR = "shards"


def _schema(layout: Layout, encoding: Encoding) -> pa.Schema:
    fields = []
    for name in encoding.columns:
        item = pa.from_numpy_dtype(encoding.dtype(name))
        kind = pa.large_list(item) if name not in encoding.fixed_columns else pa.list_(item, layout.seq_len)
        fields.append(pa.field(name, kind, nullable=False))
    return pa.schema(fields)


class ArrowFormat:
    name = "arrow"

    def __init__(self, codec: dict | None = None):
        if codec not in (None, {"name": "none"}):
            raise ValueError(f"the arrow format stores uncompressed IPC files, not {codec!r}")
        self.codec = {"name": "none"}

    def describe(self, layout: Layout, encoding: Encoding) -> dict:
        return {"format": self.name, "codec": self.codec, "ipc": "one uncompressed record batch per shard file"}

    def prepare(self, root: Path, layout: Layout, encoding: Encoding) -> None:
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shard_file(index: int) -> str:
        return f"{SHARD_DIR}/shard-{index:05d}.arrow"

    shard_prefix = shard_file
    """Where every file of shard ``index`` is: its one IPC file."""

    def write_shard(self, root: Path, layout: Layout, encoding: Encoding, index: int, columns: dict) -> list[str]:
        """Write shard ``index`` durably (temporary name, fsync, rename) and return its files."""
        arrays = []
        for name in encoding.columns:
            value = columns[name]
            if isinstance(value, Ragged):
                offsets = pa.array(value.offsets, pa.int64())
                arrays.append(pa.LargeListArray.from_arrays(offsets, pa.array(value.values)))
            else:
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), layout.seq_len))
        batch = pa.record_batch(arrays, schema=_schema(layout, encoding))
        relative = self.shard_file(index)
        with atomic_file(root / relative) as handle:
            with pa.ipc.new_file(handle, batch.schema) as writer:
                writer.write_batch(batch)
        return [relative]

    def reader(self, root: Path, layout: Layout, encoding: Encoding, cached_shards: int = 4) -> ArrowReader:
        return ArrowReader(root, layout, encoding, cached_shards)


class ArrowReader:
    """Memory-maps shard files on use; the columns it returns are views of the mapped files.

    It keeps the ``cached_shards`` most recently used mapped: a map holds its file's disk space even
    once the file is deleted, and a remote store's mirror deletes the shards least recently used to
    stay under its size limit (softcache.store.mirror)."""

    def __init__(self, root: Path, layout: Layout, encoding: Encoding, cached_shards: int = 4):
        self.root = root
        self.layout = layout
        self.encoding = encoding
        self.cached_shards = max(1, cached_shards)
        self._shards: OrderedDict[int, dict] = OrderedDict()

    def load(self, index: int) -> dict:
        if index in self._shards:
            self._shards.move_to_end(index)
        else:
            source = pa.memory_map(str(self.root / ArrowFormat.shard_file(index)))
            batch = pa.ipc.open_file(source).get_batch(0)
            count = self.layout.shard_bounds(index)[1]
            if batch.schema != _schema(self.layout, self.encoding) or batch.num_rows != count:
                raise StoreError(f"holds {batch.num_rows} rows of {batch.schema.names}, not the {count} sequences "
                                 "of the manifest's columns")
            batch.validate()  # lengths and offsets inside the mapped buffers, before any view of them
            columns = {}
            for name in self.encoding.columns:
                column = batch.column(name)
                flat = column.values.to_numpy(zero_copy_only=True)
                if name in self.encoding.fixed_columns:
                    columns[name] = flat.reshape(batch.num_rows, self.layout.seq_len)
                else:
                    columns[name] = Ragged(flat, column.offsets.to_numpy(zero_copy_only=True))
            self._shards[index] = loaded_columns(self.encoding, self.layout.seq_len, count, columns)
            while len(self._shards) > self.cached_shards:
                self._shards.popitem(last=False)
        return self._shards[index]
