"""Which files a ``--data`` directory holds, split by split.

A corpus directory is read whole or not at all: every file under it (recursively, hidden names
excluded) must have a supported type and, where the names mark splits, belong to one; otherwise
the directory is refused with one line naming the files that would be left out. Reading only the
files one builder understands (what ``datasets.load_dataset(directory)`` does with mixed types)
would change the corpus without a word. The split rule is Hugging Face datasets' naming rule, so
``train.jsonl`` + ``test.jsonl`` or ``train/`` + ``test/`` keep their held-out files apart.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from softcache.errors import SoftcacheError

BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow",
}
"""File suffix -> the datasets builder that reads it (text files are read one document per file)."""
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
"""A directory holding one of these was written by ``Dataset(Dict).save_to_disk`` and is loaded as such."""

# datasets' split keywords, set off by these separators: train/, data_train/, train.jsonl, wiki-test-00001.parquet.
_SEP = "[-._ 0-9]"
_KEYWORDS = {"train": "train|training", "validation": "validation|valid|dev|val", "test": "test|testing|eval|evaluation"}
_SPLIT_DIR = {split: re.compile(rf"(.*{_SEP})?({words})({_SEP}.*)?") for split, words in _KEYWORDS.items()}
_SPLIT_FILE = {split: re.compile(rf"(.*{_SEP})?({words}){_SEP}.*") for split, words in _KEYWORDS.items()}
_NAMED = 3  # files named in a refusal before "and N more"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in SAVED_DATASET_FILES)


def corpus_files(directory: Path, split: str) -> list[Path]:
    """The files of ``split`` under ``directory``, sorted by path; raise :class:`SoftcacheError` for
    a directory holding a softcache store, a file of an unsupported type, a file in no split, or
    no file at all.

    Names starting with ``.`` (files and directories) are not read. When sub-directory names mark
    splits (``train/``, ``test/``), they decide; else file names do (``train.jsonl``); with neither,
    every file is in ``train``.
    """
    files = _listing(directory)
    where = f"--data {directory}"
    if not files:
        raise SoftcacheError(f"{where} holds no files to read (names starting with '.' are not read)")
    for path in files:
        if path.name == "manifest.json" and _is_store(path):
            raise SoftcacheError(f"{where} holds the softcache store {path.parent}, which is not corpus text; "
                                 "move it out of the corpus directory")
    special = [path for path in files if not path.is_file()]  # a pipe or a device would block the reader
    if special:
        raise SoftcacheError(f"{where}: {_some(special, directory)} not a regular file (a pipe, socket, device or "
                             "broken link); remove such entries or point --data at the corpus files only")
    unsupported = [path for path in files if path.suffix.lower() not in BUILDERS]
    if unsupported:
        raise SoftcacheError(f"{where}: {_some(unsupported, directory)} of no supported type and would be skipped; "
                             "remove such files or point --data at the corpus files only "
                             f"(supported: {', '.join(sorted(BUILDERS))})")
    splits = _splits(directory, files)
    unassigned = sorted(set(files) - {path for members in splits.values() for path in members})
    if unassigned:
        raise SoftcacheError(f"{where} names the splits {', '.join(splits)} but {_some(unassigned, directory)} "
                             "in none of them; rename or move such files")
    if split not in splits:
        raise SoftcacheError(f"{where} has no split {split!r} (splits: {', '.join(splits)}); choose one with --split")
    return splits[split]


def _listing(directory: Path) -> list[Path]:
    """Every file under ``directory`` but hidden ones, in sorted order of their path components."""
    files, seen = [], set()
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree: each directory is read once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        files += [Path(root, name) for name in names if not name.startswith(".")]
    return sorted(files, key=lambda path: path.relative_to(directory).parts)


def _splits(directory: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Files by split: the sub-directory names mark the splits, else the file names, else all are ``train``."""
    relative = [path.relative_to(directory).parts for path in files]
    for patterns, names_of in ((_SPLIT_DIR, lambda parts: parts[:-1]), (_SPLIT_FILE, lambda parts: parts[-1:])):
        splits = {split: [path for path, parts in zip(files, relative)
                          if any(pattern.fullmatch(name) for name in names_of(parts))]
                  for split, pattern in patterns.items()}
        if any(splits.values()):
            return {split: members for split, members in splits.items() if members}
    return {"train": files}


def _is_store(manifest: Path) -> bool:
    from softcache.store.manifest import FORMAT_NAME

    try:
        return json.loads(manifest.read_bytes()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _some(paths: list[Path], directory: Path) -> str:
    """'a.bin is' / 'a.bin, b.bin, c.bin and 4 more are': the first few paths, relative to ``directory``."""
    names = ", ".join(str(path.relative_to(directory)) for path in paths[:_NAMED])
    more = f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else ""
    return f"{names}{more} {'is' if len(paths) == 1 else 'are'}"
