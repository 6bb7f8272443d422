"""Stores at fsspec URLs (``s3://``, ``gs://``, ``memory://``, ``file://``, ...), through a local mirror.

The formats read and write local files (memory maps, zarr's local store, atomic renames). A remote
store is a local directory that mirrors it, plus transfers done with fsspec (:class:`Remote`, the
URL case of softcache.store.storage's :class:`~softcache.store.storage.Storage`):

- writing: the job writes the mirror as usual and uploads each shard's files, then the shard's
  progress record, and, last, the complete manifest, so no manifest ever lists a shard that is not
  fully uploaded;
- resuming: the remote manifest, progress records and the files they list are downloaded into the
  mirror first, and then checked like local ones;
- reading: the manifest and tokenizer are downloaded when the store is opened, a shard's files when
  the shard is first read. Every download is checked against the manifest's size and sha256 and
  stays in the mirror for later readers (``SOFTCACHE_CACHE``, default ``~/.cache/softcache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

from softcache.errors import StoreError
from softcache.store.files import TMP_MARK, check_file, fsync_path, inside
from softcache.store.manifest import MANIFEST, PROGRESS_DIR, FileEntry, read_progress

CACHE_ENV = "SOFTCACHE_CACHE"


def is_remote(location) -> bool:
    """True for an fsspec URL (``protocol://...``); plain paths and Path objects are local."""
    return isinstance(location, str) and "://" in location


def mirror_dir(url: str) -> Path:
    """The local mirror of ``url``: one directory per URL under the cache."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "softcache")
    name = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return base / "stores" / name


class Remote:
    """Transfers between a store at ``url`` and its local mirror ``local``."""

    checks_fetches = True
    """Every download with an entry is checked against its size and sha256."""

    def __init__(self, url: str, local: Path | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.path = self.path.rstrip("/")
        self.local = local or mirror_dir(self.url)
        self.local.mkdir(parents=True, exist_ok=True)

    def _remote(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def exists(self, relative: str = "") -> bool:
        return self.fs.exists(self._remote(relative) if relative else self.path)

    def size(self, relative: str) -> int | None:
        try:
            return int(self.fs.info(self._remote(relative))["size"])
        except FileNotFoundError:
            return None

    def listdir(self, relative: str) -> list[str]:
        """Names of the files directly under ``relative`` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self._remote(relative), detail=False)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def fetch(self, relative: str, entry: FileEntry | None = None) -> Path:
        """Download ``relative`` into the mirror (under a temporary name, then renamed) and return its
        local path. With its shard-table ``entry``, a local copy that already matches is kept, and a
        download that does not match is refused. A path that would leave the mirror is refused."""
        target = inside(self.local, relative)
        if entry is not None and target.is_file() and check_file(self.local, entry) is None:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}")
        try:
            self.fs.get_file(self._remote(relative), str(partial))
        except FileNotFoundError as err:
            partial.unlink(missing_ok=True)
            raise StoreError(f"{self.url}: {relative} is missing") from err
        if entry is not None:
            problem = check_file(self.local, dataclasses.replace(entry, path=str(partial.relative_to(self.local))))
            if problem:
                partial.unlink(missing_ok=True)
                raise StoreError(f"{self.url}: {relative} {problem} after download; the remote store is damaged")
        os.replace(partial, target)
        return target

    def upload(self, relative: str, replace: bool = True) -> None:
        """Copy the mirror's ``relative`` to the remote store (parents created as needed);
        ``replace=False`` leaves a remote file already there as it is."""
        if not replace and self.exists(relative):
            return
        remote = self._remote(relative)
        parent = remote.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.put_file(str(inside(self.local, relative)), remote)

    def remove(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.rm(self._remote(relative), recursive=True)

    def pull_manifest(self) -> None:
        """Download the manifest (a reader opening the store); a URL without one is not a store."""
        if not self.exists(MANIFEST):
            raise StoreError(f"{self.url} is not a softcache store (no {MANIFEST})")
        self.fetch(MANIFEST)

    def pull_state(self, fresh: bool = True, files: bool = True) -> None:
        """Bring the mirror up to date with the remote store's manifest and progress records, and, with
        ``files``, the files those records list (what a resumed writer needs to decide what is done; a
        reader fetches a shard's files when it reads the shard). ``fresh`` first forgets what the
        mirror held (a writer starting; False for other ranks joining)."""
        if fresh and not self.exists(MANIFEST):
            shutil.rmtree(self.local, ignore_errors=True)  # the remote store is new: so is its mirror
            self.local.mkdir(parents=True, exist_ok=True)
            return
        if fresh:
            shutil.rmtree(self.local / PROGRESS_DIR, ignore_errors=True)
        self.fetch(MANIFEST)
        fsync_path(self.local / MANIFEST)
        for name in self.listdir(PROGRESS_DIR):
            if name.endswith(".json"):
                self.fetch(f"{PROGRESS_DIR}/{name}")
        if not files:
            return
        for record in read_progress(self.local).values():  # the usable records: the writer redoes the rest
            try:
                for entry in record.files:
                    self.fetch(entry.path, entry)
            except StoreError:
                continue
