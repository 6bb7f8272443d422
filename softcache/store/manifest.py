"""The manifest: what makes a store describe itself.

``manifest.json`` is written atomically when a job starts (``"complete": false``) and again, last,
when every shard is durable (``"complete": true``, with the shard table). While a job runs, each
finished shard also gets a record in ``progress/``; those records are what a resumed job trusts.
Readers trust only the manifest's shard table, or, for an unfinished store opened on purpose, the
progress records.
"""

from __future__ import annotations

import json
from pathlib import Path

from softcache.errors import StoreError

MANIFEST = "manifest.json"
PROGRESS_DIR = "progress"
TOKENIZER_DIR = "tokenizer"
FORMAT_NAME = "softcache-store"
FORMAT_VERSION = 2
REQUIRED = ("format", "format_version", "complete", "storage", "layout", "encoding", "targets", "teacher", "tokenizer", "corpus", "shards")
# Sections that must match for a job to resume into an existing store.
IDENTITY = ("storage", "layout", "encoding", "targets", "teacher", "tokenizer", "corpus")


def progress_name(index: int) -> str:
    return f"{PROGRESS_DIR}/shard-{index:05d}.json"


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
    if version < FORMAT_VERSION:
        raise StoreError(
            f"{path} has format version {version}, from an older softcache; this one reads version "
            f"{FORMAT_VERSION}: rerun its softcache cache command into a new directory"
        )
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise StoreError(f"{path} lacks required fields: {', '.join(missing)}")
    return manifest


def identity_differences(existing: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two manifests' identity sections."""
    differences: list[str] = []
    for section in IDENTITY:
        _diff(existing.get(section), wanted.get(section), section, differences)
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


def read_progress(root: Path) -> dict[int, dict]:
    """Shard records of an unfinished job, by shard index; unreadable records are ignored."""
    records = {}
    for path in sorted((root / PROGRESS_DIR).glob("shard-*.json")):
        try:
            record = json.loads(path.read_text())
            records[int(record["index"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records
