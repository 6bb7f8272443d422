"""Zarr v3 format: one zarr group per store shard, ``data.zarr/shards/NNNNN``.

A shard's group holds one array per column: the fixed columns as [count, seq_len] arrays, the ragged
ones (:class:`~softcache.store.encoding.Ragged`) as a flat array of entries plus ``<name>_offsets``
[count + 1] (where each sequence's entries start). Each group is written under a temporary name,
fsynced and renamed into place, so a shard is either complete or absent; exactly one writer owns it.
Every group opens with plain zarr.
Readers load a whole shard (its encoded, still compact arrays) and keep the few most recent ones,
because training reads a handful of shards at a time (see softcache.data).
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np

from softcache.errors import StoreError
from softcache.store.consistency import array_limit, loaded_columns
from softcache.store.encoding import Encoding, Ragged
from softcache.store.files import TMP_MARK, fsync_path
from softcache.store.layout import Layout

GROUP = "data.zarr"
CHUNK_BYTES = 1 << 24  # largest chunk before compression (blosc caps a chunk at 2 GB)
# Measured on SmolLM2 targets (benchmarks/results/cache_job.md, benchmarks/results/encodings.md): zstd at
# level 9 inside blosc, which first splits each array's values into byte planes ("shuffle"), is the smallest
# codec tried: 4.4% under plain zstd-9 for a ranked top-64 store, cache_job.md (the high bytes of ids and gaps
# are mostly zero, and a plane of them compresses to almost nothing). Its compression costs the writer well under
# 1% of a CPU teacher's time (the writer's CPU seconds per 1,000 tokens in cache_job.md).
DEFAULT_CODEC = {"name": "blosc", "cname": "zstd", "level": 9, "shuffle": "shuffle"}


def _codecs(codec: dict) -> list:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec["name"] == "none":
        return []
    if codec["name"] == "zstd":
        return [ZstdCodec(level=codec["level"])]
    if codec["name"] == "blosc":
        return [BloscCodec(cname=codec.get("cname", "zstd"), clevel=codec["level"], shuffle=codec.get("shuffle", "shuffle"))]
    raise ValueError(f"unknown zarr codec {codec!r}")


def shard_group(index: int) -> str:
    return f"{GROUP}/shards/{index:05d}"


class ZarrFormat:
    name = "zarr"

    def __init__(self, codec: dict | None = None):
        self.codec = dict(codec or DEFAULT_CODEC)
        _codecs(self.codec)  # refuse unknown codecs early

    def describe(self, layout: Layout, encoding: Encoding) -> dict:
        return {"format": self.name, "codec": self.codec, "shards": f"{shard_group(0)[:-5]}NNNNN: one zarr group each"}

    def prepare(self, root: Path, layout: Layout, encoding: Encoding) -> None:
        (root / GROUP / "shards").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shard_prefix(index: int) -> str:
        """The directory that holds every file of shard ``index``."""
        return shard_group(index)

    def write_shard(self, root: Path, layout: Layout, encoding: Encoding, index: int, columns: dict) -> list[str]:
        """Write shard ``index`` durably and atomically; return its files (relative to ``root``)."""
        import zarr

        final = root / shard_group(index)
        staging = final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        group = zarr.open_group(str(staging), mode="w")
        with zarr.config.set({"array.write_empty_chunks": True}):  # a shard is always the same set of files
            for name, value in columns.items():
                arrays = ({name: value.values, f"{name}_offsets": value.offsets} if isinstance(value, Ragged)
                          else {name: value})
                for array_name, data in arrays.items():
                    row_bytes = max(1, data[0:1].nbytes)
                    chunk = (max(1, min(len(data), CHUNK_BYTES // row_bytes)), *data.shape[1:])
                    array = group.create_array(array_name, shape=data.shape, dtype=data.dtype, chunks=chunk,
                                               compressors=_codecs(self.codec), fill_value=0)
                    array[...] = data
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in files:
            fsync_path(path)
        for directory in sorted({p.parent for p in files} | {staging}, key=lambda p: -len(p.parts)):
            fsync_path(directory)
        if final.exists():
            shutil.rmtree(final)  # a crashed run's shard without a progress record: rewritten
        os.replace(staging, final)
        fsync_path(final.parent)
        return [str((final / p.relative_to(staging)).relative_to(root)) for p in files]

    def reader(self, root: Path, layout: Layout, encoding: Encoding, cached_shards: int = 4) -> ZarrReader:
        return ZarrReader(root, layout, encoding, cached_shards)


class ZarrReader:
    """Loads whole shards on demand and keeps the ``cached_shards`` most recently used.

    Each array's shape and dtype, as its zarr.json declares them, are checked against the layout
    before the array is read: a damaged zarr.json must not size an allocation."""

    def __init__(self, root: Path, layout: Layout, encoding: Encoding, cached_shards: int):
        self.root = root
        self.layout = layout
        self.encoding = encoding
        self.cached_shards = max(1, cached_shards)
        self._cache: OrderedDict[int, dict] = OrderedDict()

    def load(self, index: int) -> dict:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        import zarr

        group = zarr.open_group(str(self.root / shard_group(index)), mode="r")
        count = self.layout.shard_bounds(index)[1]
        columns = {}
        for name in self.encoding.columns:
            data = self._read(group, name, count, name)
            if name in self.encoding.ragged_columns:
                columns[name] = Ragged(data, self._read(group, f"{name}_offsets", count, "offsets"))
            else:
                columns[name] = data
        columns = loaded_columns(self.encoding, self.layout.seq_len, count, columns)
        self._cache[index] = columns
        while len(self._cache) > self.cached_shards:
            self._cache.popitem(last=False)
        return columns

    def _read(self, group, name: str, count: int, dtype_of: str) -> np.ndarray:
        if name not in group:
            raise StoreError(f"has no array {name}")
        array = group[name]
        shape, most = array_limit(self.encoding, self.layout.seq_len, count, name)
        want = np.dtype("int64") if dtype_of == "offsets" else self.encoding.dtype(name)
        if array.dtype != want or (shape is not None and array.shape != shape) or (
                shape is None and (array.ndim != 1 or array.shape[0] > most)):
            raise StoreError(f"declares {name} as {array.dtype}{list(array.shape)}, which a shard of {count} "
                             "sequences cannot hold")
        return np.asarray(array[...])
