"""Zarr v3 format: one group ``data.zarr`` with three arrays, sharded along the sequence axis.

Each array's zarr shard spans exactly one store shard (``shard_size`` sequences), so a store shard
is three zarr shard files and one writer owns them; inner chunks of a few sequences are the unit of
reading. The whole store opens with plain zarr as ordinary [N, L(, k)] arrays. zarr's LocalStore
already writes each file under a temporary name and renames it; we add the fsyncs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softcache.store.files import fsync_path
from softcache.store.layout import ARRAYS, Layout

GROUP = "data.zarr"
CHUNK_BYTES = 1 << 18  # target size of an inner chunk before compression
# Measured on SmolLM2 top-64 targets (benchmarks/results/cache_job.md): byte-shuffled blosc-zstd
# is the smallest of the codecs tried (189 B/token vs 216 for plain zstd-1, 258 raw) and reads as fast.
DEFAULT_CODEC = {"name": "blosc", "cname": "zstd", "level": 3, "shuffle": "shuffle"}


def _codecs(codec: dict) -> list:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec["name"] == "none":
        return []
    if codec["name"] == "zstd":
        return [ZstdCodec(level=codec["level"])]
    if codec["name"] == "blosc":
        return [BloscCodec(cname=codec.get("cname", "zstd"), clevel=codec["level"], shuffle=codec.get("shuffle", "shuffle"))]
    raise ValueError(f"unknown zarr codec {codec!r}")


def chunk_sequences(layout: Layout) -> int:
    """Sequences per inner chunk: about CHUNK_BYTES of target ids, at least 1, at most a shard."""
    per_sequence = layout.seq_len * layout.k * layout.dtype("target_ids").itemsize
    return max(1, min(layout.shard_size, CHUNK_BYTES // per_sequence))


class ZarrFormat:
    name = "zarr"
    suffix = ".zarr"

    def __init__(self, codec: dict | None = None):
        self.codec = dict(codec or DEFAULT_CODEC)

    def describe(self, layout: Layout) -> dict:
        return {"format": self.name, "codec": self.codec, "chunk_sequences": chunk_sequences(layout)}

    def prepare(self, root: Path, layout: Layout) -> None:
        """Create the group and arrays (metadata only); an existing identical group is kept."""
        import zarr

        group = zarr.open_group(root / GROUP, mode="a")
        chunk = chunk_sequences(layout)
        for name in ARRAYS:
            row = layout.row_shape(name)
            if name in group:
                continue
            group.create_array(
                name,
                shape=(layout.num_sequences, *row),
                dtype=layout.dtype(name),
                chunks=(chunk, *row),
                shards=(layout.shard_size, *row),
                compressors=_codecs(self.codec),
                fill_value=0,
            )
        for path in sorted((root / GROUP).rglob("zarr.json")):
            fsync_path(path)

    def shard_files(self, layout: Layout, index: int) -> list[str]:
        """Paths, relative to the store, of the files that make up shard ``index``."""
        files = []
        for name in ARRAYS:
            tail = "/".join(["0"] * len(layout.row_shape(name)))
            files.append(f"{GROUP}/{name}/c/{index}/{tail}")
        return files

    def write_shard(self, root: Path, layout: Layout, index: int, arrays: dict[str, np.ndarray]) -> list[str]:
        """Write shard ``index`` durably and return its files."""
        import zarr

        first, count = layout.shard_bounds(index)
        group = zarr.open_group(root / GROUP, mode="r+")
        # Write every chunk, even all-zero ones, so a shard is always the same set of files.
        with zarr.config.set({"array.write_empty_chunks": True}):
            for name in ARRAYS:
                group[name][first : first + count] = arrays[name]
        files = self.shard_files(layout, index)
        for relative in files:
            fsync_path(root / relative)
        for directory in {(root / f).parent for f in files}:
            fsync_path(directory)
        return files

    def reader(self, root: Path, layout: Layout) -> ZarrReader:
        return ZarrReader(root, layout)


class ZarrReader:
    """Reads row ranges; opens arrays lazily so that a forked DataLoader worker opens its own."""

    def __init__(self, root: Path, layout: Layout):
        self.root = root
        self.layout = layout
        self._arrays = None

    def _open(self) -> dict:
        if self._arrays is None:
            import zarr

            group = zarr.open_group(self.root / GROUP, mode="r")
            self._arrays = {name: group[name] for name in ARRAYS}
        return self._arrays

    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) (global sequence numbers, inside shard ``index``) in on-disk dtypes."""
        return {name: array[start:stop] for name, array in self._open().items()}

    def read_rows(self, index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Sorted unique global ``rows`` inside shard ``index``; one zarr call per array."""
        return {name: array.oindex[rows] for name, array in self._open().items()}
