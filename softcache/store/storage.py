"""Where a store's files are kept: one interface for a local directory and for a URL.

The formats read and write local files only (memory maps, zarr's local store, atomic renames).
:class:`Storage` is what stands between that local directory and the store itself. For a store on a
local filesystem (:class:`Local`) the directory is the store, and every transfer is a no-op. For a
store at an fsspec URL (:class:`~softcache.store.remote.Remote`) the directory is a mirror, kept in
step by downloads and uploads. Readers and writers make the same calls in the same order either way,
so a remote store's ordering (a shard's files, then its progress record, then, last, the complete
manifest) is kept by the one code path that local stores also take, at no cost to them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Protocol, runtime_checkable

from softcache.store.manifest import FileEntry
from softcache.store.remote import Remote, is_remote


@runtime_checkable
class Storage(Protocol):
    """A store's files, seen from the local directory ``local`` that the formats use."""

    local: Path
    """The directory the formats read and write: the store itself, or a remote store's mirror."""
    checks_fetches: bool
    """Whether :meth:`fetch` with an entry checks the file against its size and sha256 (a download
    is checked), so that a reader need not hash it again."""

    def pull_manifest(self) -> None:
        """Bring the store's manifest into ``local``, for a reader."""

    def pull_state(self, fresh: bool = True, files: bool = True) -> None:
        """Bring the manifest and progress records into ``local``, and with ``files`` the files those
        records list; ``fresh`` (a writer starting) first forgets what ``local`` held."""

    def fetch(self, relative: str, entry: FileEntry | None = None) -> Path:
        """The local path of the store's file ``relative``, there to be read. With its ``entry``, a
        copy already there that matches it is kept; without, a remote file is fetched again."""

    def reading(self, entries: list[FileEntry]) -> ContextManager[None]:
        """A block that reads the files of ``entries`` from ``local``: they are there (fetched if need
        be) and stay there while it runs, or, if another process took one away meanwhile,
        :class:`~softcache.store.remote.FileVanished` is raised when it ends, to read them again."""

    def upload(self, relative: str, replace: bool = True) -> None:
        """Publish ``local/relative`` to the store; ``replace=False`` keeps a file already published."""

    def remove(self, relative: str) -> None:
        """Delete ``relative`` (a file or a directory) from the published store."""


class Local:
    """A store in a local directory: ``local`` is the store itself, so there is nothing to transfer.

    It creates nothing: a missing directory or manifest is reported by whoever reads it."""

    checks_fetches = False

    def __init__(self, root: str | Path):
        self.local = Path(root)

    def pull_manifest(self) -> None:
        pass

    def pull_state(self, fresh: bool = True, files: bool = True) -> None:
        pass

    def fetch(self, relative: str, entry: FileEntry | None = None) -> Path:
        # Paths from a manifest were checked when it was parsed (no absolute path, no '..'); a symbolic
        # link out of the store is caught where the file is checked (softcache.store.files.check_file).
        return self.local / relative

    def reading(self, entries: list[FileEntry]) -> ContextManager[None]:
        return contextlib.nullcontext()  # the store itself: no other reader removes its files

    def upload(self, relative: str, replace: bool = True) -> None:
        pass

    def remove(self, relative: str) -> None:
        pass


def open_storage(location: str | Path, reader: bool = False) -> Storage:
    """:class:`Remote` for an fsspec URL (``protocol://...``, mirrored under ``SOFTCACHE_CACHE``),
    :class:`Local` for a path. A ``reader`` keeps the mirror under ``SOFTCACHE_CACHE_LIMIT``."""
    return Remote(location, evicts=reader) if is_remote(location) else Local(location)
