"""The node's local copies of remote stores (``SOFTCACHE_CACHE``), kept under a size limit.

Every store at a URL has a directory under ``<cache>/stores`` (softcache.store.remote). A store of a
trillion tokens does not fit on a training node's disk, so with a limit (``SOFTCACHE_CACHE_LIMIT``)
a reader makes room before each download by deleting shard files, least recently used first. A
file's modification time is set each time it is used, so every process on the node sees the same
order. Never deleted: manifests, progress records and tokenizers (small, needed to open a store),
files still downloading, every file of a mirror that a teacher job is writing (it holds
``writer.lock``), and the files this process has pinned: the shards it is reading and fetching ahead.

Each process keeps its own account of the cache, following its downloads, uses and evictions, and
looks at the disk again every ``RESCAN_SECONDS`` for what other processes did (a full scan per
download would cost seconds on a cache of many thousand files).

Processes share the mirror without locks between them. A process pins only against its own
evictions; when another process deletes a file this one is about to read, the reader notices (the
file is not the one it opened: :meth:`softcache.store.remote.Remote.reading`) and fetches it again.
So the limit is a target, exceeded by what is pinned: keep it above every reader's working set
(about two windows of shards plus the shards fetched ahead, per reader).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from pathlib import Path

from softcache.store.files import TMP_MARK
from softcache.store.manifest import MANIFEST, PROGRESS_DIR, TOKENIZER_DIR, WRITER_LOCK

STORES = "stores"
KEPT = (MANIFEST, WRITER_LOCK)
KEPT_DIRS = (PROGRESS_DIR, TOKENIZER_DIR)
RESCAN_SECONDS = 10.0
"""How long a process trusts its own account of the cache (its downloads, uses and evictions) before it
looks at the disk again, to see what other processes added and removed."""


class Mirror:
    """What the processes' readers share about the cache directory ``base`` within this process: pins,
    one download of a file at a time, and which files were already checked (one object per directory:
    :meth:`at`)."""

    _open: dict[Path, Mirror] = {}
    _opening = threading.Lock()

    def __init__(self, base: Path):
        self.base = base
        self._lock = threading.Lock()
        self._evicting = threading.RLock()
        self._reserved = 0
        self._pins: Counter[Path] = Counter()
        self._downloads: dict[Path, threading.Lock] = {}
        self._checked: dict[Path, tuple] = {}
        self._files: dict[Path, tuple[int, int, bool]] = {}
        self._scanned = float("-inf")

    @classmethod
    def at(cls, base: Path) -> Mirror:
        with cls._opening:
            return cls._open.setdefault(base, cls(base))

    @classmethod
    def _forget_all(cls) -> None:
        """A forked child starts afresh: the parent's pins and locks (maybe held by a thread that the child
        does not have) are not its own."""
        cls._open = {}
        cls._opening = threading.Lock()

    # ---- pins ----------------------------------------------------------------------------------

    def pin(self, paths) -> None:
        """Keep ``paths`` (present or not yet) from this process's evictions until :meth:`unpin`."""
        with self._lock:
            self._pins.update(paths)

    def unpin(self, paths) -> None:
        with self._lock:
            self._pins.subtract(paths)
            for path in paths:
                if self._pins[path] <= 0:
                    del self._pins[path]

    @contextlib.contextmanager
    def pinned(self, paths):
        paths = list(paths)
        self.pin(paths)
        try:
            yield
        finally:
            self.unpin(paths)

    # ---- downloads -----------------------------------------------------------------------------

    def downloading(self, path: Path) -> threading.Lock:
        """The lock that one download of ``path`` holds: a reader needing a file that is being fetched
        ahead waits for that download instead of starting its own."""
        with self._lock:
            return self._downloads.setdefault(path, threading.Lock())

    def checked(self, path: Path, sha256: str) -> bool:
        """Whether ``path`` is the very file this process checked against ``sha256`` (same inode and
        size), so it need not be hashed again."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        return self._checked.get(path) == (stat.st_dev, stat.st_ino, stat.st_size, sha256)

    def remember(self, path: Path, sha256: str) -> None:
        stat = path.stat()
        self._checked[path] = (stat.st_dev, stat.st_ino, stat.st_size, sha256)

    def used(self, path: Path) -> None:
        """Mark ``path`` as just used (its modification time, the eviction order)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
            with self._lock:
                if path in self._files:
                    self._files[path] = (time.time_ns(), *self._files[path][1:])

    def added(self, path: Path) -> None:
        """Count ``path``, just downloaded, without waiting for the next look at the disk."""
        store = _store_of(self.base, path)
        if store is not None:
            with self._lock:
                writing = (store / WRITER_LOCK).exists()
                self._files[path] = (time.time_ns(), path.stat().st_size, not writing and _evictable(path, store))

    # ---- the limit -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def room_for(self, nbytes: int, limit: int):
        """A block that downloads ``nbytes``: first make room for them under ``limit`` (:meth:`make_room`),
        then count them as taken until the block ends (when the file, complete, counts itself)."""
        with self._evicting:
            self.make_room(nbytes, limit)
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._evicting:
                self._reserved -= nbytes

    def make_room(self, nbytes: int, limit: int) -> int:
        """Delete unpinned shard files, least recently used first, until the cache's complete files, this
        process's downloads in progress and ``nbytes`` more fit in ``limit`` bytes (or nothing more can
        go); return the bytes deleted."""
        with self._evicting:
            self._look_again()
            with self._lock:
                total = sum(size for _, size, _ in self._files.values()) + self._reserved
                candidates = sorted((used, size, path) for path, (used, size, evictable) in self._files.items()
                                    if evictable and self._pins[path] <= 0)
            freed = 0
            for _, size, path in candidates:
                if total - freed + nbytes <= limit:
                    break
                with self._lock:
                    if self._pins[path] > 0:  # pinned meanwhile
                        continue
                    self._files.pop(path, None)
                    self._checked.pop(path, None)
                with contextlib.suppress(FileNotFoundError):  # another process evicted it first
                    path.unlink()
                freed += size
            return freed

    def usage(self) -> int:
        """Bytes of the complete files under the cache's stores, as they are on disk now."""
        return sum(size for _, size, _ in _scan(self.base).values())

    def _look_again(self) -> None:
        """Refresh this process's account of the cache from the disk when it is older than
        ``RESCAN_SECONDS`` (meanwhile it follows its own downloads, uses and evictions)."""
        if time.monotonic() - self._scanned > RESCAN_SECONDS:
            files = _scan(self.base)
            with self._lock:
                self._files, self._scanned = files, time.monotonic()


def _scan(base: Path) -> dict[Path, tuple[int, int, bool]]:
    """Every complete file under ``base``'s stores: (last use in ns, bytes, whether it may be evicted).
    Downloads in progress (temporary files) are left out: their bytes are reserved instead."""
    files = {}
    root = base / STORES
    stores = [entry.path for entry in os.scandir(root) if entry.is_dir()] if root.is_dir() else []
    for store in stores:
        store = Path(store)
        writing = (store / WRITER_LOCK).exists()
        pending = [store]
        while pending:
            try:
                entries = list(os.scandir(pending.pop()))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif TMP_MARK not in entry.name:
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    path = Path(entry.path)
                    files[path] = (stat.st_mtime_ns, stat.st_size, not writing and _evictable(path, store))
    return files


def _store_of(base: Path, path: Path) -> Path | None:
    """The store directory under ``base`` that holds ``path`` (None: not in the cache)."""
    try:
        relative = path.relative_to(base / STORES)
    except ValueError:
        return None
    return base / STORES / relative.parts[0] if len(relative.parts) > 1 else None


def _evictable(path: Path, store: Path) -> bool:
    """Whether ``path``, a file of the mirror ``store``, is a shard file (not a manifest, a progress
    record, a tokenizer file or the writer's lock)."""
    parts = path.relative_to(store).parts
    return not (parts[0] in KEPT_DIRS or (len(parts) == 1 and parts[0] in KEPT))


os.register_at_fork(after_in_child=Mirror._forget_all)
