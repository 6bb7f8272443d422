"""Creating, resuming and finishing a store.

:class:`StoreWriter` owns a store directory for one job. Opening it either starts a new store,
resumes an unfinished one whose identity matches (skipping every shard with a valid progress
record), or refuses with the list of differences. Shards are written one at a time by exactly one
writer; the complete manifest is written last. The writer is a context manager: leaving its block,
finished or not, frees the store's writer lock, so an interrupted job can be rerun at once.

The writer works in a local directory and publishes through its
:class:`~softcache.store.storage.Storage` as it goes (a no-op for a local store; uploads from a
local mirror for a store at a URL): each shard's files, then its progress record, and the complete
manifest last.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


from softcache import lock
from softcache.errors import StoreError
from softcache.store.consistency import (
    column_problem,
    shard_table_problems,
    store_content_digest,
    teacher_cross_entropy,
    totals_problems,
)
from softcache.store.files import check_file, content_sha256, describe_file, remove_temporaries, write_json
from softcache.store.encoding import Encoding, to_disk
from softcache.store.layout import Layout
from softcache.store.manifest import (
    FORMAT_NAME,
    MANIFEST,
    MANIFEST_SEAL,
    PROGRESS_DIR,
    RECORD_SEAL,
    TOKENIZER_DIR,
    WRITER_LOCK,
    ShardRecord,
    Totals,
    identity_differences,
    manifest_table,
    progress_name,
    read_manifest,
    read_progress,
    format_version,
    sealed,
)
from softcache.store.registry import make_format
from softcache.store.storage import Storage, open_storage
from softcache.version import __version__


class StoreWriter:
    """Writes the shards of one store: ``with StoreWriter.open(...) as writer:``, then
    :meth:`write_shard` for each pending shard, then :meth:`finish`."""

    def __init__(self, storage: Storage, header: dict, done: dict[int, ShardRecord], complete: bool):
        self.storage = storage
        """Where the store is published (softcache.store.storage); ``root`` is its local directory."""
        self.root = storage.local
        self.header = header
        self.layout = Layout.from_dict(header["layout"])
        self.encoding = Encoding.from_dict(header["encoding"])
        self.format = make_format(header["storage"])
        self.done = done
        """Records of the shards written so far (all of them once complete), by shard index."""
        self.complete = complete

    @classmethod
    def open(cls, root: str | Path, header: dict, out_flag: str = "--out", join: bool = False) -> StoreWriter:
        """Start or resume the store at ``root`` (a path or an fsspec URL) described by ``header`` (a
        manifest without shards).

        ``join=True`` is for the other ranks of a multi-rank job, once rank 0 has opened the store:
        it checks the identity but creates nothing and removes nothing (another rank may be writing).

        Raises :class:`StoreError` if ``root`` holds something else: a file, a directory with other
        content, or a store whose identity sections differ from ``header``'s.
        """
        storage = open_storage(root)
        storage.pull_state(fresh=not join)  # a store at a URL: what it holds so far, into the mirror
        if join:
            return cls._join(storage, header, out_flag)
        writer = cls._start(storage, header, out_flag)
        if not writer.complete:
            storage.upload(MANIFEST, replace=False)  # a new store's first manifest, never over a published one
        return writer

    @classmethod
    def _start(cls, storage: Storage, header: dict, out_flag: str) -> StoreWriter:
        """Open the store in ``storage.local`` as its only writer: create it or resume it."""
        root = storage.local
        if root.exists() and not root.is_dir():
            raise StoreError(f"{out_flag} {root} is a file; give a directory for the store")
        header = _stamped(header)
        if (root / MANIFEST).exists():
            existing = _same_store(root, header, out_flag)
            if existing["complete"]:
                return cls(storage, existing, _shard_table(root, existing), complete=True)
        elif root.exists() and any(root.iterdir()):
            raise StoreError(f"{out_flag} {root} is not empty and holds no softcache store; give a new or empty directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise StoreError(f"{out_flag} {root} is not writable ({err.strerror})") from err
        take_lock(root, out_flag)
        remove_temporaries(root)
        if not (root / MANIFEST).exists():
            write_json(root / MANIFEST, sealed({**header, "complete": False, "shards": []}, MANIFEST_SEAL))
        writer = cls(storage, header, {}, complete=False)
        writer.format.prepare(root, writer.layout, writer.encoding)
        writer._keep_valid_progress()
        return writer

    @classmethod
    def _join(cls, storage: Storage, header: dict, out_flag: str) -> StoreWriter:
        header = _stamped(header)
        existing = _same_store(storage.local, header, out_flag)
        if existing["complete"]:
            return cls(storage, existing, _shard_table(storage.local, existing), complete=True)
        writer = cls(storage, header, {}, complete=False)
        writer._keep_valid_progress()
        return writer

    def refresh(self) -> None:
        """Reread the progress records (other ranks' shards included); keep the valid ones."""
        if not self.complete:
            self.storage.pull_state(fresh=False)
            self._keep_valid_progress()

    def _keep_valid_progress(self) -> None:
        """``done`` from the progress records in ``root`` (already pulled), the valid ones only (a record
        checked once is not checked again while it stays the same)."""
        self.done = {i: r for i, r in read_progress(self.root).items()
                     if self.done.get(i) == r or self._record_is_valid(r)}

    @property
    def pending(self) -> list[int]:
        """Shard indices still to write, in order."""
        return [i for i in range(self.layout.num_shards) if i not in self.done]

    def _record_is_valid(self, record: ShardRecord) -> bool:
        """A progress record counts only if it fits this layout, lists the shard's own files, those
        files are intact, and the columns they hold have the content digest it records: a resumed job
        trusts nothing a record says that the files do not bear out."""
        if shard_table_problems(self.layout, [record], self.format.shard_prefix, complete=False):
            return False
        if any(check_file(self.root, f) is not None for f in record.files):
            return False
        try:
            columns = self.format.reader(self.root, self.layout, self.encoding, 1).load(record.index)
        except Exception:  # whatever the bytes are: the shard is rewritten
            return False
        return content_sha256(columns) == record.content_sha256

    def write_shard(self, index: int, columns: dict, teacher_nll: dict | None = None) -> ShardRecord:
        """Write shard ``index`` (its encoded columns, see softcache.store.encoding) durably and
        record it as done.

        ``teacher_nll`` ({"sum", "count"}: the teacher's summed cross-entropy on the shard's true next
        tokens) is kept in the shard's record when given."""
        first, count = self.layout.shard_bounds(index)
        self._check_columns(columns, count)
        columns = {name: columns[name] for name in self.encoding.columns}
        try:
            written = self.format.write_shard(self.root, self.layout, self.encoding, index,
                                              to_disk(self.encoding, columns))
        except OSError as err:
            raise StoreError(
                f"could not write shard {index} of {self.root} ({err.strerror or err}); the shards written "
                "so far are kept: fix the problem and rerun the same command to resume"
            ) from err
        files = tuple(describe_file(self.root, f) for f in written)
        record = ShardRecord(index=index, first=first, count=count, bytes=sum(f.bytes for f in files),
                             content_sha256=content_sha256(columns), files=files, teacher_nll=teacher_nll)
        write_json(self.root / progress_name(index), sealed(record.to_dict(), RECORD_SEAL))
        for entry in files:  # published: the files, then the record that vouches for them
            self.storage.upload(entry.path)
        self.storage.upload(progress_name(index))
        self.done[index] = record
        return record

    def _check_columns(self, columns: dict, count: int) -> None:
        """The job's columns are what readers will check them to be (an internal invariant)."""
        assert sorted(columns) == sorted(self.encoding.columns), f"columns {sorted(columns)} != {self.encoding.columns}"
        problem = column_problem(self.encoding, self.layout.seq_len, count, columns)
        assert problem is None, f"shard of {count} sequences {problem}"

    def release_lock(self) -> None:
        """Give up the writer lock if this process holds it (a job that stops without finishing)."""
        release_lock(self.root)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release_lock()  # finished or not (an error, an interrupt): the rerun must not be refused

    def save_tokenizer(self, save: Callable[[Path], object]) -> None:
        """Call ``save(directory)`` (e.g. a tokenizer's save_pretrained) and swap the result in atomically."""
        final = self.root / TOKENIZER_DIR
        staging = self.root / f"{TOKENIZER_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        save(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for path in sorted(final.rglob("*")):
            if path.is_file():
                self.storage.upload(str(path.relative_to(self.root)))

    def finish(self) -> dict:
        """Write the complete manifest (last, atomically) and drop the progress records."""
        if self.complete:
            return self.header
        missing = self.pending
        assert not missing, f"shards {missing} were never written"
        shards = [self.done[i] for i in range(self.layout.num_shards)]
        tokenizer_dir = self.root / TOKENIZER_DIR
        extra = [
            describe_file(self.root, str(p.relative_to(self.root)))
            for p in sorted(tokenizer_dir.rglob("*"))
            if p.is_file()
        ]
        if problems := shard_table_problems(self.layout, shards, self.format.shard_prefix, True, extra):
            raise StoreError(f"{self.root} was not marked complete: {problems[0]}")
        data_bytes = sum(s.bytes for s in shards)
        manifest = {
            **self.header,
            "complete": True,
            "totals": {
                "sequences": self.layout.num_sequences,
                "tokens": self.layout.num_tokens,
                "data_bytes": data_bytes,
                "bytes_per_token": data_bytes / self.layout.num_tokens,
                "content_sha256": store_content_digest(shards),
                **teacher_cross_entropy(shards),
            },
            "files": [entry.to_dict() for entry in extra],
            "shards": [shard.to_dict() for shard in shards],
        }
        if problems := totals_problems(self.layout, shards, Totals.from_dict(manifest["totals"])):
            raise StoreError(f"{self.root} was not marked complete: {problems[0]}")
        manifest = sealed(manifest, MANIFEST_SEAL)
        write_json(self.root / MANIFEST, manifest)
        release_lock(self.root)
        self.storage.upload(MANIFEST)  # last: now a remote store is complete too
        self.storage.remove(PROGRESS_DIR)
        shutil.rmtree(self.root / PROGRESS_DIR, ignore_errors=True)
        self.header, self.complete = manifest, True
        return manifest


def _stamped(header: dict) -> dict:
    """``header`` with the format name and the versions that every manifest carries."""
    return {"format": FORMAT_NAME, "format_version": format_version(header["encoding"]),
            "softcache_version": __version__, **header}


def _same_store(root: Path, header: dict, out_flag: str) -> dict:
    """The manifest at ``root``; raises when its identity differs from ``header``'s, naming each difference."""
    existing = read_manifest(root)
    differences = identity_differences(existing, header)
    if differences:
        raise StoreError(f"{out_flag} {root} holds a different store ({'; '.join(differences)}); "
                         "use another directory, or the settings it was written with")
    return existing


def _shard_table(root: Path, manifest: dict) -> dict[int, ShardRecord]:
    """The records of a complete store's shards, by shard index."""
    return {shard.index: shard for shard in manifest_table(manifest, "shards", ShardRecord, root / MANIFEST)}


LOCK = WRITER_LOCK


def take_lock(root: Path, out_flag: str = "--out") -> None:
    """Make this process the store's only writer: ``root/writer.lock`` names the host and pid (see
    softcache.lock). The lock is released when the store is finished or its writer is left; it
    guards one filesystem (a remote store's lock is its local mirror's)."""
    lock.take(root / LOCK, f"{out_flag} {root}", "being written by another teacher job", StoreError)


def release_lock(root: Path) -> None:
    """Remove ``root``'s writer lock if this process holds it."""
    lock.release(root / LOCK)


BOOKKEEPING = ("format", "format_version", "softcache_version", "complete", "shards", "totals", "files", MANIFEST_SEAL)


def derived_header(manifest: dict, **changes) -> dict:
    """A header for a new store with ``manifest``'s description, minus what a writer fills in itself."""
    return {**{key: value for key, value in manifest.items() if key not in BOOKKEEPING}, **changes}
