"""Reading and verifying a store, whatever its format.

:class:`Store` maps sequence numbers to shards through the manifest's shard table (parsed once, into
:class:`~softcache.store.manifest.ShardRecord` objects) and returns numpy arrays. A store whose
teacher job has not finished is refused unless the caller asks for its complete part
(``allow_incomplete=True``), which then reads only shards with a progress record. A store at a URL
is read through a local mirror, each file fetched when first needed or ahead of need
(softcache.store.storage, softcache.store.prefetch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softcache.errors import StoreError, one_line
from softcache.store.consistency import (
    decoded_problem,
    owned_by,
    shard_table_problems,
    totals_problems,
)
from softcache.store.encoding import DOCUMENT_STARTS, Encoding, concat, decode, segments_of, take
from softcache.store.files import TMP_MARK, check_file, content_sha256
from softcache.store.layout import Layout
from softcache.store.manifest import (
    MANIFEST,
    PROGRESS_DIR,
    TOKENIZER_DIR,
    WRITER_LOCK,
    CorpusSection,
    FileEntry,
    ShardRecord,
    TargetsSection,
    TeacherSection,
    TokenizerSection,
    Totals,
    manifest_table,
    read_manifest,
    read_progress,
    read_sections,
)
from softcache.store.registry import make_format
from softcache.store.remote import FileVanished
from softcache.store.storage import Local, open_storage

READ_TRIES = 3
"""Reads of a shard whose files another process evicts from a shared mirror meanwhile (each is
fetched again), before the store is reported unreadable."""


class Store:
    """A store opened for reading. ``len(store)`` is the number of readable sequences.

    ``cached_shards``: how many shards a zarr reader keeps loaded (training reads a few at a time).
    ``refuse_inconsistent=False`` opens a store whose shard table or totals do not add up, listing
    the problems in :attr:`problems` (what ``softcache verify`` does) instead of raising.
    """

    def __init__(self, root: str | Path, allow_incomplete: bool = False, cached_shards: int = 4,
                 verify_checksums: bool = True, refuse_inconsistent: bool = True):
        self.verify_checksums = verify_checksums
        """Check each shard's files against their sha256 the first time this object reads the shard."""
        self.storage = open_storage(root, reader=True)
        """Where the store's files are (softcache.store.storage); ``root`` is its local directory."""
        self.storage.pull_manifest()
        self.root = self.storage.local
        self.manifest = read_manifest(self.root)
        sections = read_sections(self.manifest, self.root / MANIFEST)
        self.layout: Layout = sections["layout"]
        self.encoding: Encoding = sections["encoding"]
        self.format = make_format(self.manifest["storage"])
        """The on-disk format (``.name``, ``.codec``) the manifest's storage section describes."""
        self.targets: TargetsSection = sections["targets"]
        """What the targets are (``store.targets.kind``, ``.temperature``, ``.spec``: softcache.kinds)."""
        self.teacher: TeacherSection = sections["teacher"]
        self.tokenizer: TokenizerSection = sections["tokenizer"]
        self.corpus: CorpusSection = sections["corpus"]
        self.totals: Totals | None = sections["totals"]
        """Sums over the shards; None until the store is complete."""
        self.cached_shards = cached_shards
        manifest_path = self.root / MANIFEST
        self.tokenizer_files: list[FileEntry] = manifest_table(self.manifest, "files", FileEntry, manifest_path)
        """The tokenizer's files (the complete manifest's ``files``), checked by :meth:`verify`."""
        if self.manifest["complete"]:
            shards = manifest_table(self.manifest, "shards", ShardRecord, manifest_path)
        else:
            self.storage.pull_state(fresh=False, files=False)  # shards are fetched when read
            records = read_progress(self.root)
            if not allow_incomplete:
                raise StoreError(
                    f"{self.root} is incomplete: its teacher job has not finished "
                    f"({len(records)} of {self.layout.num_shards} shards written); rerun the same "
                    "softcache cache command to finish it, or read the finished part on purpose "
                    "(softcache train --allow-incomplete; open_store(..., allow_incomplete=True))"
                )
            shards = [records[i] for i in sorted(records)]
        self.shards: list[ShardRecord] = shards
        """The readable shards in order: the manifest's shard table, or the progress records."""
        self.problems: list[str] = shard_table_problems(self.layout, shards, self.format.shard_prefix,
                                                        self.complete, self.tokenizer_files)
        """Where the shard table or the totals do not add up (see softcache.store.consistency)."""
        if self.complete:
            self.problems += (totals_problems(self.layout, shards, self.totals) if self.totals
                              else ["the complete manifest has no totals"])
        if self.problems and refuse_inconsistent:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise StoreError(f"{manifest_path}: {self.problems[0]}{more}; the store's metadata is inconsistent "
                             f"(softcache verify {self.root} lists every problem): restore it from a copy or "
                             "write the store again")
        self._ends = np.cumsum([s.count for s in self.shards], dtype=np.int64)
        self._reader = None
        self._fetched: set[int] = set()
        for entry in self.tokenizer_files:
            self.storage.fetch(entry.path, entry)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def tokenizer_path(self) -> Path:
        """Directory with the teacher's tokenizer files (loadable with AutoTokenizer)."""
        return self.root / TOKENIZER_DIR

    @property
    def k(self) -> int:
        """Entries per position in what :meth:`read_rows` returns (padded where fewer are stored)."""
        return self.encoding.k

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"Store({str(self.root)!r}, {self.format.name}, {self.encoding.kind}, {len(self)} sequences, {state})"

    def shard_columns(self, slot: int) -> dict:
        """Every column of the ``slot``-th readable shard, in on-disk dtypes.

        The first time a shard is read, its files are checked against their sha256 and its columns
        against its record's content digest (unless ``verify_checksums`` is off); its shapes, lengths
        and offsets are checked every time it is loaded, before anything is sized from them."""
        shard = self.shards[slot]
        first_read = slot not in self._fetched
        for _ in range(READ_TRIES):
            try:
                with self.storage.reading(shard.files):  # a remote store's files: fetched, kept while read
                    if first_read and self.verify_checksums and not self.storage.checks_fetches:
                        for entry in shard.files:  # (a download is checked anyway)
                            if problem := check_file(self.root, entry):
                                raise self._damaged(shard, f"({entry.path}) {problem}")
                    if self._reader is None:
                        self._reader = self.format.reader(self.root, self.layout, self.encoding, self.cached_shards)
                    columns = self._load(self._reader, shard)
                break
            except FileVanished:  # what the reader loaded (and keeps) may lack the file: start afresh
                self._reader = None
        else:
            raise StoreError(f"{self.root}: shard {shard.index}'s files left the local mirror {READ_TRIES} times "
                             "while being read (other readers evicting them); raise SOFTCACHE_CACHE_LIMIT")
        if first_read:
            if self.verify_checksums and content_sha256(columns) != shard.content_sha256:
                raise self._damaged(shard, "holds columns whose content digest differs from its record's")
            self._fetched.add(slot)
        return columns

    def fetch_shard(self, slot: int) -> None:
        """Bring the ``slot``-th readable shard's files into the local directory (a remote store's mirror),
        without reading them: what fetching ahead does (softcache.store.prefetch)."""
        for entry in self.shards[slot].files:
            self.storage.fetch(entry.path, entry)

    def shard_paths(self, slot: int) -> list[Path]:
        """Where the ``slot``-th readable shard's files are (or will be) in the local directory."""
        return [self.root / entry.path for entry in self.shards[slot].files]

    def slots_of(self, indices) -> np.ndarray:
        """The readable shard (its slot in :attr:`shards`) of each sequence number in ``indices``."""
        return np.searchsorted(self._ends, np.asarray(indices, dtype=np.int64), side="right")

    def _load(self, reader, shard: ShardRecord) -> dict:
        """Shard ``shard``'s columns through ``reader``, checked; whatever its bytes are, a damaged shard
        is one :class:`StoreError` naming it."""
        try:
            columns = reader.load(shard.index)
        except StoreError as err:
            raise self._damaged(shard, str(err)) from None
        except Exception as err:  # the format library parsing damaged bytes: any of its error types
            raise self._damaged(shard, f"cannot be read ({one_line(err)})") from err
        return columns

    def _damaged(self, shard: ShardRecord, problem: str) -> StoreError:
        return StoreError(f"{self.root}: shard {shard.index} {problem}; the store is damaged (softcache verify "
                          f"{self.root} lists every damaged file; restore them from a copy or write the store again)")

    def read_columns(self, indices) -> dict:
        """The encoded columns of sequences ``indices`` (any order, repeats allowed), in that order.

        Rows are grouped by shard and each shard is loaded once, so a batch drawn from a few shards
        costs a few loads."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sequence index outside the store's {len(self)} sequences")
        slots = self.slots_of(indices)
        order = np.argsort(slots, kind="stable")
        parts = []
        for slot in np.unique(slots):
            where = order[slots[order] == slot]
            local = indices[where] - (int(self._ends[slot]) - self.shards[slot].count)
            parts.append(take(self.shard_columns(int(slot)), local))
        if not parts:
            return take(self.shard_columns(0), np.zeros(0, dtype=np.int64)) if self.shards else {}
        joined = concat(parts)
        if np.array_equal(order, np.arange(len(order))):
            return joined
        inverse = np.empty(len(indices), dtype=np.int64)
        inverse[order] = np.arange(len(indices))
        return take(joined, inverse)

    def read_rows(self, indices) -> dict[str, np.ndarray]:
        """Sequences at ``indices`` (any order, repeats allowed), decoded: ``input_ids`` [n, L] int64,
        ``target_ids`` [n, L, k] int64 and ``target_logprobs`` [n, L, k] float32 (natural-log
        probabilities over the full vocabulary; padding entries repeat slot 0's id with -inf).

        A masked store adds ``teach`` [n, L] bool (the positions that hold targets; the others decode
        to a point mass on id 0); a documents store adds ``segments`` [n, L] int32 (each position's
        document number within its sequence: softcache.packing)."""
        columns = self.read_columns(indices)
        ids, logprobs = decode(self.encoding, columns)
        if problem := decoded_problem(self.encoding, ids, logprobs):
            raise StoreError(f"{self.root}: a shard {problem}; the store is damaged (softcache verify {self.root} "
                             "names it)")
        rows = {"input_ids": columns["input_ids"].astype(np.int64), "target_ids": ids, "target_logprobs": logprobs}
        if self.encoding.masked:
            rows["teach"] = columns["target_lengths"] > 0
        if self.encoding.documents:
            rows["segments"] = segments_of(columns[DOCUMENT_STARTS], self.layout.seq_len)
        return rows

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Sequences [start, stop), decoded as in :meth:`read_rows`."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) outside the store's {len(self)} sequences")
        return self.read_rows(np.arange(start, stop))

    def check_tokenizer(self) -> None:
        """Raise :class:`StoreError` unless the store's tokenizer files are there and intact (against the
        complete manifest's sha256s; an unfinished store's tokenizer directory must at least exist)."""
        advice = f"restore it from a copy or write the store again (softcache verify {self.root} lists every damaged file)"
        if not self.tokenizer_files and not (self.tokenizer_path / "tokenizer_config.json").is_file():
            raise StoreError(f"{self.root}: the store's tokenizer ({self.tokenizer_path}) is missing; {advice}")
        for entry in self.tokenizer_files:
            if problem := check_file(self.root, entry):
                raise StoreError(f"{self.root}: the store's tokenizer file {entry.path} {problem}; {advice}")

    def verify(self) -> list[str]:
        """Check everything; return one line per problem (empty: the store is intact): the shard table
        and totals against the layout, every file against its sha256, every shard's decoded columns
        against its record's content digest, and (for a local store) no data file that no record
        lists. A remote store's files are fetched again, so the remote copies are what is checked."""
        problems = list(self.problems)
        if not self.complete:
            problems.append(f"store is incomplete: {len(self.shards)} of {self.layout.num_shards} shards written")
        reader = self.format.reader(self.root, self.layout, self.encoding, 1)
        for shard in self.shards:
            damaged = self._file_problems(shard.files, f"shard {shard.index}: ")
            problems += damaged
            if damaged:
                continue
            try:
                columns = self._load(reader, shard)
            except StoreError as err:
                problems.append(str(err).split("; the store is damaged")[0].removeprefix(f"{self.root}: "))
                continue
            if content_sha256(columns) != shard.content_sha256:
                problems.append(f"shard {shard.index}: its columns' content digest differs from its record's")
        problems += self._file_problems(self.tokenizer_files, "")
        if isinstance(self.storage, Local):
            problems += [f"{path} is in the store but no record lists it" for path in self._unlisted_files()]
        return problems

    def _file_problems(self, entries, where: str) -> list[str]:
        problems = []
        for entry in entries:
            try:
                self.storage.fetch(entry.path)
            except StoreError as err:
                problems.append(f"{where}{err}")
                continue
            if problem := check_file(self.root, entry):
                problems.append(f"{where}{entry.path} {problem}")
        return problems

    def _unlisted_files(self) -> list[str]:
        """Files under a shard's place, or the tokenizer's, that no record lists (a local store)."""
        listed = {entry.path for shard in self.shards for entry in shard.files}
        listed |= {entry.path for entry in self.tokenizer_files}
        kept = (MANIFEST, WRITER_LOCK, PROGRESS_DIR)
        unlisted = []
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root).as_posix()
            if path.is_dir() or relative in listed or any(owned_by(relative, k) for k in kept) or TMP_MARK in relative:
                continue
            if not self.complete and not any(owned_by(relative, self.format.shard_prefix(s.index)) for s in self.shards):
                continue  # an unfinished job's shard without a record yet: it is rewritten on resume
            if self.tokenizer_files or not owned_by(relative, TOKENIZER_DIR):
                unlisted.append(relative)
        return unlisted


def open_store(root: str | Path, allow_incomplete: bool = False, cached_shards: int = 4,
               verify_checksums: bool = True) -> Store:
    """Open the store at ``root`` for reading (either format). Its shard table is checked against its
    layout and totals at once; each shard's files are checked against their sha256, and its columns
    against its content digest, when first read (``verify_checksums=False`` skips those, for trusted
    local disks; shapes, lengths and offsets are checked either way)."""
    return Store(root, allow_incomplete=allow_incomplete, cached_shards=cached_shards,
                 verify_checksums=verify_checksums)
