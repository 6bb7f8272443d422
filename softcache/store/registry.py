"""The format registry: a plain dict from format name to class.

A format class takes an optional codec dict and provides ``describe``, ``prepare``,
``shard_files``, ``write_shard`` and ``reader`` (see :class:`StoreFormat`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from softcache.store.arrow_format import ArrowFormat
from softcache.store.layout import Layout
from softcache.store.zarr_format import ZarrFormat


class ShardReader(Protocol):
    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Global rows [start, stop) of shard ``index``, in on-disk dtypes."""

    def read_rows(self, index: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Sorted unique global ``rows`` of shard ``index``, in on-disk dtypes."""


class StoreFormat(Protocol):
    name: str

    def describe(self, layout: Layout) -> dict: ...
    def prepare(self, root: Path, layout: Layout) -> None: ...
    def shard_files(self, layout: Layout, index: int) -> list[str]: ...
    def write_shard(self, root: Path, layout: Layout, index: int, arrays: dict[str, np.ndarray]) -> list[str]: ...
    def reader(self, root: Path, layout: Layout) -> ShardReader: ...


FORMATS: dict[str, type] = {"zarr": ZarrFormat, "arrow": ArrowFormat}


def make_format(storage: dict) -> StoreFormat:
    """The format object described by a manifest's ``storage`` section."""
    return FORMATS[storage["format"]](storage.get("codec"))


def storage_section(format_name: str, layout: Layout, codec: dict | None = None) -> dict:
    """The manifest's ``storage`` section for a new store in ``format_name`` (default codec if None)."""
    fmt = FORMATS[format_name](codec)
    return {**fmt.describe(layout), "ids": layout.id_dtype, "values": layout.value_dtype}
