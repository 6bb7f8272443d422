"""The format registry: a plain dict from format name to class.

A format class takes an optional codec dict and provides ``describe``, ``shard_prefix``,
``prepare``, ``write_shard`` and ``reader`` (see :class:`StoreFormat`). A reader checks what the
format's own metadata declares (shapes, row counts) against the layout before it reads an array. Formats store *columns* (see
softcache.store.encoding): they neither know nor care what the targets mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from softcache.store.arrow_format import ArrowFormat
from softcache.store.encoding import Encoding
from softcache.store.layout import Layout
from softcache.store.zarr_format import ZarrFormat


class ShardReader(Protocol):
    def load(self, index: int) -> dict:
        """Every column of shard ``index``, in on-disk dtypes (fixed: [count, L]; ragged: a Ragged),
        checked when read from disk (:func:`softcache.store.consistency.column_problem`; a
        :class:`StoreError` naming the problem), not again when served from memory."""


class StoreFormat(Protocol):
    name: str

    def describe(self, layout: Layout, encoding: Encoding) -> dict: ...
    def shard_prefix(self, index: int) -> str:
        """The file, or the directory, that holds every file of shard ``index`` (relative to the root)."""
    def prepare(self, root: Path, layout: Layout, encoding: Encoding) -> None: ...
    def write_shard(self, root: Path, layout: Layout, encoding: Encoding, index: int, columns: dict) -> list[str]: ...
    def reader(self, root: Path, layout: Layout, encoding: Encoding, cached_shards: int = 4) -> ShardReader: ...


FORMATS: dict[str, type] = {"zarr": ZarrFormat, "arrow": ArrowFormat}


def make_format(storage: dict) -> StoreFormat:
    """The format object described by a manifest's ``storage`` section."""
    return FORMATS[storage["format"]](storage.get("codec"))


def storage_section(format_name: str, layout: Layout, encoding: Encoding, codec: dict | None = None) -> dict:
    """The manifest's ``storage`` section for a new store in ``format_name`` (default codec if None)."""
    return FORMATS[format_name](codec).describe(layout, encoding)
