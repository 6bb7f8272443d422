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
  the shard is first read (or earlier, fetched ahead: softcache.store.prefetch). Every download is
  checked against the manifest's size and sha256 and stays in the mirror for later readers
  (``SOFTCACHE_CACHE``, default ``~/.cache/softcache``), under a size limit if one is set
  (softcache.store.mirror).

Every request is one attempt within a timeout, retried with backoff (softcache.store.transfer). A
download lands under a temporary name and is renamed into place only once complete and checked, so
a failed or abandoned attempt never leaves a file that passes for complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import ContextManager, TypeVar

from softcache.errors import StoreError
from softcache.store.files import TMP_MARK, check_file, fsync_path, inside
from softcache.store.manifest import MANIFEST, PROGRESS_DIR, FileEntry, read_progress
from softcache.store.mirror import STORES, Mirror
from softcache.store.transfer import RemoteSettings, with_retries, within

CACHE_ENV = "SOFTCACHE_CACHE"
_attempt_numbers = itertools.count()
T = TypeVar("T")


def cache_dir() -> Path:
    """The cache directory (``SOFTCACHE_CACHE``, default ``~/.cache/softcache``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "softcache").absolute()


def is_remote(location) -> bool:
    """True for an fsspec URL (``protocol://...``); plain paths and Path objects are local."""
    return isinstance(location, str) and "://" in location


def mirror_dir(url: str) -> Path:
    """The local mirror of ``url``: one directory per URL under the cache."""
    name = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir() / STORES / name


class FileVanished(Exception):
    """A file left the mirror while it was being read (another process evicted it): read it again."""


class Remote:
    """Transfers between a store at ``url`` and its local mirror ``local``.

    ``evicts``: before each download, make room in the cache for it (``SOFTCACHE_CACHE_LIMIT``):
    readers do; a writer keeps what it writes (a teacher job's mirror is never evicted)."""

    checks_fetches = True
    """Every download with an entry is checked against its size and sha256."""

    def __init__(self, url: str, local: Path | None = None, evicts: bool = False,
                 settings: RemoteSettings | None = None):
        import fsspec

        self.settings = settings or RemoteSettings.from_environment()
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.path = self.path.rstrip("/")
        self.cache = cache_dir()
        self.local = local or mirror_dir(self.url)
        self.local.mkdir(parents=True, exist_ok=True)
        self.evicts = evicts

    @property
    def mirror(self) -> Mirror:
        """What this process's readers of the cache share (pins, downloads in progress)."""
        return Mirror.at(self.cache)

    def _remote(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    # ---- requests, each retried --------------------------------------------------------------

    def _attempts(self, action: str, relative: str, attempt: Callable[[], T]) -> T:
        return with_retries(self.settings, self.url, action, relative, attempt)

    def _request(self, action: str, relative: str, call: Callable[[], T]) -> T:
        return self._attempts(action, relative, lambda: within(self.settings.timeout, call))

    def exists(self, relative: str = "") -> bool:
        path = self._remote(relative) if relative else self.path
        return self._request("looking up", relative or ".", lambda: _found(self.fs.info, path) is not None)

    def size(self, relative: str) -> int | None:
        info = self._request("looking up", relative, lambda: _found(self.fs.info, self._remote(relative)))
        return None if info is None else int(info["size"])

    def listdir(self, relative: str) -> list[str]:
        """Names of the files directly under ``relative`` (empty when it does not exist)."""
        entries = self._request("listing", relative,
                                lambda: _found(self.fs.ls, self._remote(relative), detail=False)) or []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    # ---- downloads -----------------------------------------------------------------------------

    def fetch(self, relative: str, entry: FileEntry | None = None) -> Path:
        """Download ``relative`` into the mirror (under a temporary name, then renamed) and return its
        local path. With its shard-table ``entry``, a local copy that already matches is kept, and a
        download that does not match is refused. A path that would leave the mirror is refused."""
        return self._fetch(inside(self.local, relative), relative, entry)

    def _fetch(self, target: Path, relative: str, entry: FileEntry | None) -> Path:
        mirror = self.mirror
        with mirror.downloading(target):
            if entry is not None and self._intact(target, entry):
                mirror.used(target)
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            limit = self.settings.cache_limit if self.evicts else None
            room = mirror.room_for(entry.bytes if entry else 0, limit) if limit else contextlib.nullcontext()
            with room:
                partial = self._attempts("downloading", relative, lambda: self._download(relative, target))
                if entry is not None:
                    problem = check_file(self.local, dataclasses.replace(entry, path=str(partial.relative_to(self.local))))
                    if problem:
                        partial.unlink(missing_ok=True)
                        raise StoreError(f"{self.url}: {relative} {problem} after download; the remote store is damaged")
                os.replace(partial, target)
            mirror.added(target)
            if entry is not None:
                mirror.remember(target, entry.sha256)
            return target

    def _intact(self, target: Path, entry: FileEntry) -> bool:
        """Whether the mirror's ``target`` matches ``entry`` (hashed once per process and file)."""
        if self.mirror.checked(target, entry.sha256):
            return True
        if not target.is_file() or check_file(self.local, entry) is not None:
            return False
        self.mirror.remember(target, entry.sha256)
        return True

    def _download(self, relative: str, target: Path) -> Path:
        """One attempt: ``relative`` into a temporary file of its own beside ``target``, returned. An
        attempt given up on (timed out) deletes its file whenever it ends."""
        partial = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}-{next(_attempt_numbers)}")

        def get() -> None:
            try:
                self.fs.get_file(self._remote(relative), str(partial))
            except BaseException:
                partial.unlink(missing_ok=True)
                raise

        within(self.settings.timeout, get, abandon=lambda: partial.unlink(missing_ok=True))
        return partial

    def reading(self, entries: list[FileEntry]) -> ContextManager[None]:
        """While the block runs, the files of ``entries`` are in the mirror (fetched if needed) and this
        process evicts none of them. Another process may: then :class:`FileVanished` is raised when
        the block ends (a file is missing, or is not the one that was there when the block began), so
        that the caller reads it again instead of trusting what it read."""
        return self._reading(entries)

    @contextlib.contextmanager
    def _reading(self, entries: list[FileEntry]):
        paths = [inside(self.local, entry.path) for entry in entries]
        with self.mirror.pinned(paths):
            for path, entry in zip(paths, entries):
                self._fetch(path, entry.path, entry)
            try:
                handles = [os.open(path, os.O_RDONLY) for path in paths]
            except FileNotFoundError:
                raise FileVanished from None
            try:
                try:
                    yield
                except StoreError:
                    if not _same_files(paths, handles):
                        raise FileVanished from None  # the damage was another process's eviction
                    raise
                if not _same_files(paths, handles):
                    raise FileVanished
            finally:
                for handle in handles:
                    os.close(handle)

    # ---- uploads -------------------------------------------------------------------------------

    def upload(self, relative: str, replace: bool = True) -> None:
        """Copy the mirror's ``relative`` to the remote store (parents created as needed);
        ``replace=False`` leaves a remote file already there as it is."""
        if not replace and self.exists(relative):
            return
        remote = self._remote(relative)
        source = str(inside(self.local, relative))

        def put() -> None:
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(source, remote)

        self._request("uploading", relative, put)

    def remove(self, relative: str) -> None:
        self._request("removing", relative, lambda: _found(self.fs.rm, self._remote(relative), recursive=True))

    # ---- what readers and writers pull first ---------------------------------------------------

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


def _found(call, *args, **kwargs):
    """``call(*args, **kwargs)``, or None where the remote file is not there."""
    try:
        return call(*args, **kwargs)
    except FileNotFoundError:
        return None


def _same_files(paths: list[Path], handles: list[int]) -> bool:
    """Whether each path still names the file its handle has open (not deleted, not replaced)."""
    for path, handle in zip(paths, handles):
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return False
        opened = os.fstat(handle)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            return False
    return True
