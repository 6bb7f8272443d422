"""A store seen through a student's tokenizer: the "view", a small side file built once per tokenizer.

A view holds the alignment (softcache.alignment) of every sequence of a complete store to one
student tokenizer, the vocabulary map between the two tokenizers (softcache.vocab_map) and that
tokenizer's files; any number of students of that tokenizer train from the store through it, with
no teacher and no second pass over the corpus. It lives beside the store, never in it (a store
lists every file it holds).

On disk, a directory:

- ``view.json``: format and version; the store it was built from (content sha256, tokenizer
  fingerprint); the student tokenizer's fingerprint and size; counts (sequences, student positions,
  aligned positions, text bytes, the teacher's cached mass at aligned positions and the part of it
  that maps exactly); the longest student sequence; the sha256 of the other files.
- ``rows.arrow``: Arrow IPC file, one row per store sequence, in store order: ``ids``, ``home`` and
  ``teacher_pos`` (list<int32>, softcache.alignment) and ``text_bytes`` (int64).
- ``student_of.npy``: [teacher vocabulary] int32, the student id of each teacher id (-1: none).
- ``tokenizer/``: the student's tokenizer (``save_pretrained``).

It is written under a temporary name and renamed into place when whole: a view that exists is
complete, and two jobs building the same view at once both end with one whole view.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from softcache.alignment import SEQUENCES_PER_CALL, Aligner
from softcache.errors import SoftcacheError, one_line
from softcache.tokenizer import tokenizer_fingerprint
from softcache.vocab_map import UNMAPPED

log = logging.getLogger(__name__)
VIEW_FORMAT = "softcache-view"
VIEW_VERSION = 1
MANIFEST = "view.json"
ROWS = "rows.arrow"
MAP = "student_of.npy"
TOKENIZER_DIR = "tokenizer"
_SCHEMA = pa.schema([("ids", pa.list_(pa.int32())), ("home", pa.list_(pa.int32())),
                     ("teacher_pos", pa.list_(pa.int32())), ("text_bytes", pa.int64())])


@dataclass(frozen=True)
class ViewCounts:
    """What a view's student learns from, summed over the store (``view.json``'s ``counts``)."""

    sequences: int
    positions: int
    """Student positions with a next token (those that get cross-entropy)."""
    aligned: int
    """Positions aligned with a teacher position (those that also get the KD term)."""
    text_bytes: int
    cached_mass: float
    """The teacher's cached probability mass, summed over aligned positions."""
    mapped_mass: float
    """The part of it on ids with a student token of the same bytes (the exact projection's)."""

    def __post_init__(self):
        for name in ("sequences", "positions", "aligned", "text_bytes"):
            _count(getattr(self, name))
        for name in ("cached_mass", "mapped_mass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} {value!r} is not a finite mass")

    @property
    def aligned_share(self) -> float:
        return self.aligned / max(self.positions, 1)

    @property
    def mapped_share(self) -> float:
        """Share of the teacher's cached mass at aligned positions that maps exactly."""
        return self.mapped_mass / self.cached_mass if self.cached_mass else 0.0

    def describe(self) -> str:
        return (f"{self.aligned_share:.1%} of {self.positions:,} student positions aligned with the teacher's; "
                f"{self.mapped_share:.1%} of the teacher's cached mass there maps to student tokens exactly")


class View:
    """An opened view (see the module docstring)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise SoftcacheError(f"{self.path} is not a view ({MANIFEST} is missing); build one with softcache view")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise SoftcacheError(f"{manifest_path} does not read as JSON ({err}); build the view again") from err
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != VIEW_FORMAT or \
                self.manifest.get("format_version") != VIEW_VERSION:
            found = self.manifest if isinstance(self.manifest, dict) else {}
            raise SoftcacheError(f"{self.path} is not a {VIEW_FORMAT} of version {VIEW_VERSION} "
                                 f"(format {found.get('format')!r}, version {found.get('format_version')!r}); "
                                 "build the view again with this softcache")
        try:  # every field the view is read by, of its type: one line, not a traceback, for a hand-edited file
            self.counts = ViewCounts(**self.manifest["counts"])
            self.max_length = _count(self.manifest["max_length"])
            self.student_vocab = _count(self.manifest["student"]["size"])
            digests = {name: str(self.manifest["sha256"][name]) for name in (ROWS, MAP)}
            for key in ("tokenizer_fingerprint", "content_sha256"):
                str(self.manifest["store"][key])
            str(self.manifest["student"]["tokenizer_fingerprint"])
        except (KeyError, TypeError, ValueError) as err:
            raise SoftcacheError(f"{manifest_path} is damaged ({type(err).__name__}: {err}); delete the view and build "
                                 "it again") from None
        if verify:
            for name, digest in digests.items():
                if not (self.path / name).is_file() or _sha256(self.path / name) != digest:
                    raise SoftcacheError(f"{self.path / name} does not match its sha256 in {MANIFEST}; the view is "
                                         "damaged: delete it and build it again")
        self._table = None
        self._student_of = None

    @property
    def student_of(self) -> np.ndarray:
        """[teacher vocabulary] int64: the student id of each teacher id, -1 where none (read once)."""
        if self._student_of is None:
            try:
                self._student_of = np.load(self.path / MAP).astype(np.int64)
            except (OSError, ValueError) as err:
                raise SoftcacheError(f"{self.path / MAP} does not read ({err}); the view is damaged: delete it and "
                                     "build it again") from err
        return self._student_of

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    def __len__(self) -> int:
        return self.counts.sequences

    def check_store(self, store, flag: str = "--view") -> None:
        """Refuse a view built from another store's content or tokenizer, or one whose student vocabulary has
        no room for a projected row's tail (softcache.cross_losses.project_targets)."""
        built = self.manifest["store"]
        if built["tokenizer_fingerprint"] != store.tokenizer.fingerprint or built["content_sha256"] != _digest(store):
            raise SoftcacheError(f"{flag} {self.path} was built from another store (content sha256 "
                                 f"{built['content_sha256'][:16]}, not {_digest(store)[:16]}); build a view of this "
                                 "store with softcache view")
        if store.k >= self.student_vocab:
            raise SoftcacheError(f"{flag} {self.path}: the store holds {store.k} ids per position and the student's "
                                 f"tokenizer has {self.student_vocab}; projecting the teacher's targets needs a student "
                                 "vocabulary larger than that")

    def check_tokenizer(self, fingerprint: str, what: str, flag: str) -> None:
        if fingerprint != self.manifest["student"]["tokenizer_fingerprint"]:
            raise SoftcacheError(f"{flag} {self.path} was built for another tokenizer than {what}'s; build a view for "
                                 "that tokenizer (softcache view --tokenizer ...) at another path")

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Sequences ``indices`` padded to :attr:`max_length`: ``ids``, ``home``, ``teacher_pos`` [n, max_length]
        int64 (padding: id 0, home 0, teacher_pos -1) and ``lengths`` [n] int64."""
        if self._table is None:  # opened lazily, in each DataLoader worker
            try:
                self._table = pa.ipc.open_file(pa.memory_map(str(self.path / ROWS))).read_all()
            except (OSError, pa.ArrowException) as err:  # a truncated file read without --verify-shards
                raise SoftcacheError(f"{self.path / ROWS} does not read ({one_line(err)}); the view is damaged: "
                                     "delete it and build it again") from err
            if self._table.num_rows != len(self) or self._table.schema != _SCHEMA:
                raise SoftcacheError(f"{self.path / ROWS} holds {self._table.num_rows:,} rows of another shape than "
                                     f"the {len(self):,} its {MANIFEST} counts; delete the view and build it again")
        taken = self._table.take(pa.array(np.asarray(indices, dtype=np.int64)))
        out, lengths = {}, None
        for name, fill in (("ids", 0), ("home", 0), ("teacher_pos", -1)):
            column = taken.column(name).combine_chunks()
            offsets = column.offsets.to_numpy()
            mine = np.diff(offsets).astype(np.int64)
            if lengths is not None and not np.array_equal(mine, lengths) or mine.size and mine.max() > self.max_length:
                raise SoftcacheError(f"{self.path / ROWS} holds a row whose lists disagree with each other or with "
                                     f"the longest sequence its {MANIFEST} gives; delete the view and build it again")
            lengths = mine
            flat = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
            padded = np.full((len(lengths), self.max_length), fill, dtype=np.int64)
            padded[np.arange(self.max_length) < lengths[:, None]] = flat[offsets[0]: offsets[-1]]
            out[name] = padded
        out["lengths"] = lengths
        return out


def build_view(store, student_tokenizer, out: str | Path, progress: bool = True) -> View:
    """Align every sequence of ``store`` (complete, opened) to ``student_tokenizer``; write the view at ``out``
    (see the module docstring) and return it opened. An existing view at ``out`` is an error."""
    from transformers import AutoTokenizer
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists():
        raise SoftcacheError(f"{out} already exists; give another path, or delete it to build the view again")
    if not store.complete:
        raise SoftcacheError(f"{store.root} is incomplete; a view is built from a finished store (its content is fixed)")
    teacher = AutoTokenizer.from_pretrained(store.tokenizer_path)
    aligner = Aligner(teacher, student_tokenizer)
    student_of = aligner.map.student_of
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    partial.mkdir(parents=True)
    try:
        totals, longest = np.zeros(5), 0
        with pa.OSFile(str(partial / ROWS), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer, \
                tqdm(total=len(store), unit="seq", desc="view", disable=not progress) as bar:
            for start in range(0, len(store), SEQUENCES_PER_CALL):
                stop = min(start + SEQUENCES_PER_CALL, len(store))
                rows = store.read(start, stop)
                alignments = aligner.align(list(rows["input_ids"]))
                writer.write_batch(_batch(alignments))
                totals += _counts(alignments, rows, student_of)
                longest = max([longest] + [len(a.ids) for a in alignments])
                bar.update(stop - start)
        np.save(partial / MAP, student_of.astype(np.int32))
        student_tokenizer.save_pretrained(partial / TOKENIZER_DIR)
        positions, aligned, text_bytes, cached, mapped = totals.tolist()
        manifest = {
            "format": VIEW_FORMAT, "format_version": VIEW_VERSION,
            "store": {"path": str(store.root), "content_sha256": _digest(store),
                      "tokenizer_fingerprint": store.tokenizer.fingerprint},
            "student": {"tokenizer_fingerprint": tokenizer_fingerprint(student_tokenizer), "size": len(student_tokenizer),
                        "mapped_ids": aligner.map.mapped, "teacher_ids": aligner.map.teacher_size},
            "counts": {"sequences": len(store), "positions": int(positions), "aligned": int(aligned),
                       "text_bytes": int(text_bytes), "cached_mass": cached, "mapped_mass": mapped},
            "max_length": int(longest),
            "sha256": {name: _sha256(partial / name) for name in (ROWS, MAP)},
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(partial, out)
        except OSError:
            if not (out / MANIFEST).exists():  # not another job's view of the same name: a real failure
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return View(out, verify=False)  # its files were hashed as they were written


def open_view(path: str | Path, store, student_tokenizer, what: str, flag: str = "--view", progress: bool = True,
              verify: bool = True) -> View:
    """The view at ``path``, checked against ``store`` and ``student_tokenizer`` (``what`` names whose it is);
    built there first when nothing is at ``path``."""
    path = Path(path)
    if not path.exists():
        view = build_view(store, student_tokenizer, path, progress)
        log.info(f"built the view {path}: {view.counts.describe()}")
    else:
        view = View(path, verify=verify)
    view.check_store(store, flag)
    view.check_tokenizer(tokenizer_fingerprint(student_tokenizer), what, flag)
    return view


def _batch(alignments) -> pa.RecordBatch:
    def lists(name):
        return pa.array([getattr(a, name) for a in alignments], type=pa.list_(pa.int32()))

    return pa.record_batch([lists("ids"), lists("home"), lists("teacher_pos"),
                            pa.array([a.text_bytes for a in alignments], type=pa.int64())], schema=_SCHEMA)


def _counts(alignments, rows: dict, student_of: np.ndarray) -> np.ndarray:
    """Student positions that teach, those aligned, text bytes, and the teacher's cached and mapped mass at
    the aligned ones (in a masked store, only the positions whose teacher position teaches count)."""
    sums = np.zeros(5)
    for r, a in enumerate(alignments):
        teach = rows["teach"][r] if "teach" in rows else np.ones(len(rows["input_ids"][r]), dtype=bool)
        taught = teach[np.maximum(a.home[1:].astype(np.int64) - 1, 0)]
        at = a.teacher_pos[:-1][a.teacher_pos[:-1] >= 0]  # the last position has no next token to count
        at = at[teach[at]]
        p = np.exp(rows["target_logprobs"][r][at].astype(np.float64))
        mapped = student_of[rows["target_ids"][r][at]] != UNMAPPED
        sums += [taught.sum(), len(at), a.text_bytes, p.sum(), (p * mapped).sum()]
    return sums


def _count(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _digest(store) -> str:
    return store.totals.content_sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
