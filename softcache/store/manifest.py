"""The manifest: what makes a store describe itself.

``manifest.json`` is written atomically when a job starts (``"complete": false``) and again, last,
when every shard is durable (``"complete": true``, with the shard table). While a job runs, each
finished shard also gets a record in ``progress/``; those records are what a resumed job trusts.
Readers trust only the manifest's shard table, or, for an unfinished store opened on purpose, the
progress records.

Both kinds of file are *sealed*: they carry the sha256 of their own content (canonical JSON, without
the seal), so a flipped byte or a hand edit is caught when the file is read, not when a count that
no longer adds up reaches a reader. The seal guards against damage, not against someone who means
harm (they can recompute it); paths and counts are checked on their own (softcache.store.consistency).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from softcache.errors import StoreError
from softcache.store.encoding import Encoding
from softcache.store.layout import Layout

MANIFEST = "manifest.json"
PROGRESS_DIR = "progress"
TOKENIZER_DIR = "tokenizer"
WRITER_LOCK = "writer.lock"
FORMAT_NAME = "softcache-store"
FORMAT_VERSION = 5
"""2 -> 3: the manifest and the progress records carry their own sha256 (their seal).
3 -> 4: masked and documents stores (encoding.masked, encoding.documents; chat corpora).
4 -> 5: the ranked id code (encoding.ids "ranked").
A store is written as the oldest version that describes it, so older softcache reads what it can."""
OLDEST_READABLE = 3


def format_version(encoding: dict) -> int:
    """The version a store with this ``encoding`` section is written as: the oldest that describes it."""
    if encoding.get("ids") == "ranked":
        return 5
    return 4 if encoding.get("masked") or encoding.get("documents") else 3
REQUIRED = ("format", "format_version", "complete", "storage", "layout", "encoding", "targets", "teacher", "tokenizer", "corpus", "shards")
# Sections that must match for a job to resume into an existing store.
IDENTITY = ("storage", "layout", "encoding", "targets", "teacher", "tokenizer", "corpus")


def progress_name(index: int) -> str:
    return f"{PROGRESS_DIR}/shard-{index:05d}.json"


MANIFEST_SEAL = "manifest_sha256"
RECORD_SEAL = "record_sha256"


def _canonical_sha256(data: dict, seal: str) -> str:
    """sha256 of ``data`` without its ``seal`` key, as sorted, compact JSON: the same values give the
    same digest however the file was indented."""
    body = {key: value for key, value in data.items() if key != seal}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(data: dict, seal: str) -> dict:
    """``data`` with its seal: the ``seal`` key set to the sha256 of the rest."""
    return {**{key: value for key, value in data.items() if key != seal}, seal: _canonical_sha256(data, seal)}


def seal_problem(data: dict, seal: str) -> str | None:
    """What is wrong with ``data``'s seal, or None when it matches its content."""
    if seal not in data:
        return f"has no {seal} (its checksum)"
    if data[seal] != _canonical_sha256(data, seal):
        return f"fails its checksum ({seal}): it changed after softcache wrote it (a damaged byte, or an edit)"
    return None


# ---- typed sections -------------------------------------------------------------------------------
# Each section of the manifest is a frozen dataclass, parsed and checked once here (``from_dict``);
# ``to_dict`` writes it back with the same keys in the same order, so a store's bytes do not depend
# on whether its header went through these types.


class Section:
    """Mixin of the section dataclasses: checked parsing from the manifest's JSON and back.

    Fields with a default are optional facts: a store written by hand or by an older tool may lack
    them, and ``info`` says so; a field that is present must have its type."""

    _OMIT_NONE: typing.ClassVar[tuple[str, ...]] = ()
    """Fields left out of the JSON when None (optional facts, not recorded as null)."""

    _AT_LEAST: typing.ClassVar[dict[str, int]] = {}
    """Smallest value of integer fields that have one (a count, a size, an index)."""

    @classmethod
    def from_dict(cls, data, where: str = ""):
        """Parse ``data`` (the section's JSON object); raise :class:`StoreError` naming ``where`` and
        the first missing or mistyped field, or an integer below its smallest value."""
        where = where or cls.__name__
        values = parse_fields(cls, data, where)
        for name, smallest in cls._AT_LEAST.items():
            if values.get(name) is not None and values[name] < smallest:
                raise StoreError(f"{where}.{name} is {values[name]}, less than {smallest}")
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in self._OMIT_NONE and getattr(self, f.name) is None)}


def parse_fields(cls, data, where: str) -> dict:
    """The fields of dataclass ``cls`` found in the JSON object ``data``, each checked against its type;
    :class:`StoreError` names ``where`` and the first missing or mistyped field. Other keys are ignored."""
    if not isinstance(data, dict):
        raise StoreError(f"{where} is {type(data).__name__}, not an object")
    hints = _type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise StoreError(f"{where} lacks the field {field.name!r}")
            continue
        value = data[field.name]
        if not _is_a(value, hints[field.name]):
            raise StoreError(f"{where}.{field.name} is {json.dumps(value)[:40]}, not {_type_name(hints[field.name])}")
        values[field.name] = value
    return values


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def read_layout(data, where: str = "layout") -> Layout:
    """The manifest's layout, checked: types, and sizes that make sense."""
    layout = Layout(**parse_fields(Layout, data, where))
    if layout.num_sequences < 0 or layout.seq_len < 2 or layout.shard_size < 1:
        raise StoreError(f"{where} is not a possible layout ({layout.num_sequences} sequences of {layout.seq_len} "
                         f"tokens in shards of {layout.shard_size})")
    return layout


def read_encoding(data, where: str = "encoding") -> Encoding:
    """The manifest's encoding, checked: types, a known kind and codes that can hold it, 1 <= k <= vocab."""
    values = parse_fields(Encoding, data, where)
    try:
        return Encoding(**values)
    except AssertionError as err:
        raise StoreError(f"{where} is not a valid encoding ({err or 'inconsistent fields'})") from None


def _is_a(value, hint) -> bool:
    """Whether a JSON value fits a field's type (int, float, str, bool, dict, list, unions with None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_a(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, origin or hint)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("NoneType", "null")


@dataclass(frozen=True, kw_only=True)
class TargetsSection(Section):
    """What the stored targets mean: their kind (softcache.kinds) and the settings it reads."""

    kind: str
    temperature: float
    """The teacher's logits were divided by this before normalising."""
    k: int | None = None
    """Entries per position (topk), or at most (topp)."""
    top_p: float | None = None
    """Mass a topp position keeps."""
    samples: int | None = None
    """Draws per position (sampled)."""
    seed: int | None = None
    """Sampling seed (sampled)."""
    draws: str | None = None
    """How a sampled store drew (softcache.targets.DRAWS): ``systematic``, or absent for independent
    draws (every store sampled before systematic draws existed)."""

    _AT_LEAST = {"k": 1, "samples": 1}

    @classmethod
    def for_kind(cls, kind: str, temperature: float, **settings) -> TargetsSection:
        """The section for ``kind``, keeping only the settings that kind uses."""
        from softcache.kinds import target_kind

        return cls(kind=kind, temperature=temperature, **{name: settings[name] for name in target_kind(kind).fields})

    @classmethod
    def from_dict(cls, data, where: str = "targets") -> TargetsSection:
        from softcache.kinds import DRAWS, TARGET_KINDS

        section = super().from_dict(data, where)
        if section.kind not in TARGET_KINDS:
            raise StoreError(f"{where}.kind is {section.kind!r}, not one of {', '.join(TARGET_KINDS)}")
        if not section.temperature > 0:
            raise StoreError(f"{where}.temperature is {section.temperature}, not greater than 0")
        if section.draws is not None and (section.draws not in DRAWS or cls.draws_field(section.draws) is None):
            raise StoreError(f"{where}.draws is {section.draws!r}, not 'systematic' (or absent: independent draws)")
        return section

    @property
    def draw_mode(self) -> str:
        """How a sampled store drew (softcache.kinds.DRAWS), ``draws`` being absent for independent draws."""
        return self.draws or "independent"

    @classmethod
    def draws_field(cls, mode: str) -> str | None:
        """The ``draws`` field for draw mode ``mode``: absent for independent draws, as stores before had it."""
        return None if mode == "independent" else mode

    @property
    def spec(self):
        """The :class:`~softcache.kinds.TargetKind` of these targets."""
        from softcache.kinds import target_kind

        return target_kind(self.kind)

    def describe(self) -> str:
        return self.spec.describe(self)

    def to_dict(self) -> dict:
        from softcache.kinds import POSITION_NOTE

        spec = self.spec
        return {"kind": self.kind, "temperature": self.temperature, "position": POSITION_NOTE,
                **{name: getattr(self, name) for name in spec.fields if getattr(self, name) is not None},
                **spec.manifest_notes()}


@dataclass(frozen=True, kw_only=True)
class TeacherSection(Section):
    """What the teacher is (not where it was loaded from): a resumed job must match it."""

    name: str
    """What the user gave as --teacher."""
    gguf_file: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    config_sha256: str | None = None
    """sha256 of the model config without bookkeeping keys (softcache.teacher.identity)."""
    dtype: str | None = None
    parameters: int | None = None


@dataclass(frozen=True, kw_only=True)
class TokenizerSection(Section):
    """The teacher's tokenizer, whose files the store keeps in ``directory``."""

    fingerprint: str
    """sha256 of the tokenizer's full definition (softcache.tokenizer.tokenizer_fingerprint)."""
    vocab_size: int
    """Logits per position of the teacher (may exceed the tokenizer's length)."""
    tokenizer_size: int | None = None
    eos_token_id: int | None = None
    directory: str = TOKENIZER_DIR

    _AT_LEAST = {"vocab_size": 1, "tokenizer_size": 1}


@dataclass(frozen=True, kw_only=True)
class CorpusSection(Section):
    """Which text the store covers."""

    source: str
    documents: int | None = None
    tokens_read: int | None = None
    dropped_tokens: int | None = None
    fingerprint: str
    """sha256 of the packed token ids (softcache.corpus.PackedCorpus.fingerprint)."""
    text_column: str | None = None
    split: str | None = None
    # How rows became sequences (softcache.documents); absent for a plain-text stream.
    input_shape: str | None = None
    """messages, prompt_completion or text."""
    chat_template_sha256: str | None = None
    """sha256 of the chat template the rows were rendered with (None: none was used)."""
    train_on: str | None = None
    """Which positions teach: assistant, completion or all."""
    packing: str | None = None
    """stream, documents or none."""
    long: str | None = None
    """What was done with documents longer than a sequence: truncate, split or drop."""
    bad_rows: int | None = None
    """Rows skipped (--skip-bad-rows)."""
    long_truncated: int | None = None
    long_split: int | None = None
    long_dropped: int | None = None
    teaching_positions: int | None = None
    """Positions that hold targets."""
    padding_positions: int | None = None
    """Positions of padding (no document)."""
    mix: dict | None = None
    """Several corpora mixed by weight (softcache.documents.Counts.mix): what each gave."""

    _OMIT_NONE = ("input_shape", "chat_template_sha256", "train_on", "packing", "long", "bad_rows", "long_truncated",
                  "long_split", "long_dropped", "teaching_positions", "padding_positions", "mix")
    _AT_LEAST = {"bad_rows": 0, "long_truncated": 0, "long_split": 0, "long_dropped": 0, "teaching_positions": 0,
                 "padding_positions": 0}


@dataclass(frozen=True, kw_only=True)
class StorageSection(Section):
    """The on-disk format and its codec; ``details`` are the format's own notes (softcache.store.registry)."""

    format: str
    codec: dict | None = None
    details: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data, where: str = "storage") -> StorageSection:
        from softcache.store.registry import FORMATS

        if not isinstance(data, dict):
            raise StoreError(f"{where} is {type(data).__name__}, not an object")
        if not isinstance(data.get("format"), str) or data["format"] not in FORMATS:
            raise StoreError(f"{where}.format is {json.dumps(data.get('format'))}, not one of {', '.join(FORMATS)}")
        codec = data.get("codec")
        if codec is not None and not isinstance(codec, dict):
            raise StoreError(f"{where}.codec is {json.dumps(codec)[:40]}, not an object")
        try:
            FORMATS[data["format"]](codec)
        except (ValueError, TypeError, KeyError) as err:
            raise StoreError(f"{where}.codec is {json.dumps(codec)[:60]}, which the {data['format']} format cannot "
                             f"read ({err})") from None
        return cls(format=data["format"], codec=codec, details={k: v for k, v in data.items() if k not in ("format", "codec")})

    def to_dict(self) -> dict:
        return {"format": self.format, **({"codec": self.codec} if self.codec is not None else {}), **self.details}


@dataclass(frozen=True, kw_only=True)
class Totals(Section):
    """Sums over a complete store's shards, written with the complete manifest."""

    sequences: int
    tokens: int
    data_bytes: int
    bytes_per_token: float
    content_sha256: str
    """Digest of the decoded content, independent of format and codec (softcache.store.writer)."""
    teacher_ce: float | None = None
    """The teacher's mean cross-entropy on the corpus's true next tokens, nats (when every shard recorded it)."""

    _OMIT_NONE = ("teacher_ce",)
    _AT_LEAST = {"sequences": 0, "tokens": 0, "data_bytes": 0}


def read_manifest(root: Path) -> dict:
    """Load and check ``root/manifest.json``; every problem is one :class:`StoreError` line."""
    path = root / MANIFEST
    if not root.exists():
        raise StoreError(f"{root} does not exist")
    if not path.is_file():
        raise StoreError(f"{root} is not a softcache store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is not valid JSON ({err}); the store's manifest is damaged") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not a softcache manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreError(
            f"{path} has format version {version}, newer than this softcache reads ({FORMAT_VERSION}); upgrade softcache"
        )
    if version < OLDEST_READABLE:
        raise StoreError(
            f"{path} has format version {version}, from an older softcache; this one reads versions "
            f"{OLDEST_READABLE} to {FORMAT_VERSION}: rerun its softcache cache command into a new directory"
        )
    if problem := seal_problem(manifest, MANIFEST_SEAL):
        raise StoreError(f"{path} {problem}; the store's manifest is damaged: restore it from a copy or "
                         "write the store again")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise StoreError(f"{path} lacks required fields: {', '.join(missing)}")
    return manifest


SECTIONS = {"layout": read_layout, "encoding": read_encoding, "storage": StorageSection.from_dict,
            "targets": TargetsSection.from_dict, "teacher": TeacherSection.from_dict,
            "tokenizer": TokenizerSection.from_dict, "corpus": CorpusSection.from_dict}
"""How each section of the manifest is parsed and checked, by name."""


def read_sections(manifest: dict, path: Path) -> dict:
    """The manifest's typed sections by name (``totals``: None before the store is complete); raises
    :class:`StoreError` naming ``path`` and the field when one is missing or has the wrong type."""
    sections = {name: parse(manifest[name], f"{path}: {name}") for name, parse in SECTIONS.items()}
    sections["totals"] = Totals.from_dict(manifest["totals"], f"{path}: totals") if "totals" in manifest else None
    return sections


def identity_differences(existing: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two manifests' identity sections. Where the target kinds differ,
    that one line stands for every targets and encoding field that follows from the kind."""
    differences: list[str] = []
    for section in IDENTITY:
        _diff(existing.get(section), wanted.get(section), section, differences)
    kinds = [(manifest.get("targets") or {}).get("kind") for manifest in (existing, wanted)]
    if kinds[0] != kinds[1]:
        differences = [line for line in differences if not line.startswith(("targets.", "encoding."))
                       or line.startswith("targets.kind:")]
    return differences


def _diff(old, new, where: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            _diff(old.get(key), new.get(key), f"{where}.{key}", out)
    elif old != new:
        out.append(f"{where}: store has {_short(old)}, this run {_short(new)}")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_progress(root: Path) -> dict[int, ShardRecord]:
    """Shard records of an unfinished job, by shard index; unreadable, unsealed or malformed records,
    and records filed under another shard's name, are ignored (their shards count as not written)."""
    records = {}
    for path in sorted((root / PROGRESS_DIR).glob("shard-*.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or seal_problem(data, RECORD_SEAL):
                continue
            record = ShardRecord.from_dict(data, str(path))
        except (OSError, ValueError, StoreError):
            continue
        if progress_name(record.index) == f"{PROGRESS_DIR}/{path.name}":
            records[record.index] = record
    return records


# ---- the shard table ------------------------------------------------------------------------------
# A shard's record is written to progress/ once the shard is durable, and copied into the complete
# manifest's ``shards``. Both are parsed here, where a store is opened; ``to_dict`` writes a record
# back key for key (teacher_nll only when it was recorded).


def relative_path_problem(relative) -> str | None:
    """Why ``relative`` cannot name a file inside a store (absolute, ``..``, empty parts, backslashes),
    or None. Paths come from manifests and records, which may come from someone else: none may leave
    the store's root."""
    if not isinstance(relative, str) or not relative:
        return "is not a relative path"
    parts = relative.split("/")
    if relative.startswith("/") or "\\" in relative or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        return "leaves the store (an absolute path, a '..', or an empty part)"
    return None


def check_digest(value: str, where: str) -> None:
    """Raise :class:`StoreError` unless ``value`` is a sha256 as softcache writes it (64 lowercase hex digits)."""
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise StoreError(f"{where} is {json.dumps(value)[:40]}, not a sha256 (64 hex digits)")


@dataclass(frozen=True, kw_only=True)
class FileEntry(Section):
    """One file of a store, as its shard table (or the manifest's ``files``) lists it."""

    path: str
    """Relative to the store's root, "/"-separated; never absolute, never through ``..``."""
    bytes: int
    """Size in bytes."""
    sha256: str
    """Hex digest of the file's bytes."""

    _AT_LEAST = {"bytes": 0}

    @classmethod
    def from_dict(cls, data, where: str = "") -> FileEntry:
        entry = super().from_dict(data, where)
        if problem := relative_path_problem(entry.path):
            raise StoreError(f"{where or 'file'}.path {entry.path!r} {problem}")
        check_digest(entry.sha256, f"{where or 'file'}.sha256")
        return entry


@dataclass(frozen=True, kw_only=True)
class ShardRecord(Section):
    """One finished shard: where its sequences are, what its files are, and digests to check both."""

    index: int
    first: int
    """Global index of the shard's first sequence."""
    count: int
    """Sequences in the shard."""
    bytes: int
    """Size of its files together, in bytes."""
    content_sha256: str
    """Digest of its columns, independent of format and codec (softcache.store.files.content_sha256)."""
    files: tuple[FileEntry, ...]
    teacher_nll: dict | None = None
    """{"sum": nats, "count": positions}: the teacher's summed cross-entropy on the shard's labelled
    positions (its true next tokens), when the job measured it."""

    _OMIT_NONE = ("teacher_nll",)
    _AT_LEAST = {"index": 0, "first": 0, "count": 1, "bytes": 0}

    @classmethod
    def from_dict(cls, data, where: str = "shard record") -> ShardRecord:
        if isinstance(data, dict) and "files" in data:
            files = data["files"]
            if not isinstance(files, list):
                raise StoreError(f"{where}.files is {json.dumps(files)[:40]}, not a list")
            data = {**data, "files": tuple(FileEntry.from_dict(entry, f"{where}.files[{i}]")
                                           for i, entry in enumerate(files))}
        record = super().from_dict(data, where)
        check_digest(record.content_sha256, f"{where}.content_sha256")
        nll = record.teacher_nll
        if nll is not None and not (set(nll) == {"sum", "count"} and _is_a(nll["sum"], float)
                                    and math.isfinite(nll["sum"]) and nll["sum"] >= 0
                                    and _is_a(nll["count"], int) and nll["count"] >= 0):
            raise StoreError(f"{where}.teacher_nll is {json.dumps(nll)[:60]}, not {{\"sum\": nats >= 0, "
                             "\"count\": positions >= 0}")
        return record

    def to_dict(self) -> dict:
        return {**super().to_dict(), "files": [entry.to_dict() for entry in self.files]}


def manifest_table(manifest: dict, key: str, section: type[Section], path: Path) -> list:
    """A complete manifest's list ``key`` (``"shards"``: ShardRecord, ``"files"``: FileEntry), parsed;
    absent is empty, and a malformed one is a :class:`StoreError` naming ``path`` (the manifest)."""
    rows = manifest.get(key, [])
    try:
        if not isinstance(rows, list):
            raise StoreError(f"{path}: {key} is {json.dumps(rows)[:40]}, not a list")
        return [section.from_dict(row, f"{path}: {key}[{i}]") for i, row in enumerate(rows)]
    except StoreError as err:
        raise StoreError(f"{err}; the store's manifest is damaged") from None
