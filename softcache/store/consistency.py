"""What a store's metadata must agree with: its layout, its sums, and the bytes it describes.

Checksums prove that a file is the one a record names; they do not prove that the records are the
right ones. A shard table with an entry removed, a record whose counts were edited, or a record
forged with no files would pass every checksum. So a store is also checked for *consistency*, in
three places and at three costs:

- when it is opened (cheap, from the manifest alone): the shard table covers the layout's sequences
  in order with no gap or overlap, each record's sizes add up, each shard names only its own files,
  and the totals equal the sums over the shards (:func:`shard_table_problems`,
  :func:`totals_problems`);
- when a shard is read (before anything is allocated from its bytes): the shapes the format's
  metadata declares fit the layout, and the decoded lengths and offsets agree with each other
  (:func:`array_limit`, :func:`column_problem`); with checksums on, the columns' content digest
  equals the record's;
- by ``softcache verify`` and before a resumed job trusts a progress record: everything above for
  every shard, content digests recomputed from the decoded columns.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np

from softcache.errors import StoreError
from softcache.store.encoding import DOCUMENT_STARTS, RAGGED, Encoding, Ragged, from_disk
from softcache.store.layout import Layout
from softcache.store.manifest import TOKENIZER_DIR, FileEntry, ShardRecord, Totals


def store_content_digest(shards: list[ShardRecord]) -> str:
    """Digest of a store's content, independent of format and codec: sha256 of the shards' digests, in order."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(bytes.fromhex(shard.content_sha256))
    return digest.hexdigest()


def teacher_cross_entropy(shards: list[ShardRecord]) -> dict:
    """{"teacher_ce": mean nats per labelled position} when every shard recorded the teacher's loss."""
    if not shards or any(s.teacher_nll is None for s in shards):
        return {}
    count = sum(s.teacher_nll["count"] for s in shards)
    return {"teacher_ce": sum(s.teacher_nll["sum"] for s in shards) / max(count, 1)}


def owned_by(path: str, prefix: str) -> bool:
    """Whether ``path`` is the file ``prefix`` or lies in the directory ``prefix``."""
    return path == prefix or path.startswith(prefix + "/")


def shard_table_problems(layout: Layout, shards: list[ShardRecord], prefix: Callable[[int], str],
                         complete: bool, tokenizer_files: list[FileEntry] = ()) -> list[str]:
    """Why the shard records (a complete manifest's table, or an unfinished job's progress records)
    cannot describe a store of ``layout``; empty when they can.

    ``prefix(index)``: where the format keeps shard ``index`` (a file or a directory); every file a
    record lists must be there. A complete table lists shards 0..n-1 in order, so with each record's
    bounds equal to the layout's, the sequences are covered with no gap and no overlap."""
    problems = []
    listed = [s.index for s in shards]
    if complete and (len(listed) != layout.num_shards or any(index != i for i, index in enumerate(listed))):
        present = set(listed)  # nothing sized by the layout: its numbers may be the damaged ones
        missing = [i for i in range(min(layout.num_shards, len(listed) + 8)) if i not in present]
        total = layout.num_shards - sum(1 for i in present if i < layout.num_shards)
        problems.append(f"the shard table lists {len(listed)} shards for a layout of {layout.num_shards}"
                        + (f" (missing: {_some(missing, total)})" if missing else " (out of order or repeated)"))
    owners: dict[str, int] = {}
    for shard in shards:
        where = f"shard {shard.index}"
        if shard.index >= layout.num_shards:
            problems.append(f"{where} is outside the layout's {layout.num_shards} shards")
            continue
        first, count = layout.shard_bounds(shard.index)
        if (shard.first, shard.count) != (first, count):
            problems.append(f"{where} claims sequences {shard.first}..{shard.first + shard.count - 1}, "
                            f"the layout puts {first}..{first + count - 1} there")
        if not shard.files:
            problems.append(f"{where} lists no files")
        if shard.bytes != sum(f.bytes for f in shard.files):
            problems.append(f"{where} records {shard.bytes} bytes but its files add up to "
                            f"{sum(f.bytes for f in shard.files)}")
        for entry in shard.files:
            if not owned_by(entry.path, prefix(shard.index)):
                problems.append(f"{where} lists {entry.path}, which is not one of its files")
            elif entry.path in owners:
                problems.append(f"{where} lists {entry.path}, already listed by shard {owners[entry.path]}")
            owners[entry.path] = shard.index
    for entry in tokenizer_files:
        if not owned_by(entry.path, TOKENIZER_DIR):
            problems.append(f"the tokenizer's files list {entry.path}, outside {TOKENIZER_DIR}/")
    return problems


def totals_problems(layout: Layout, shards: list[ShardRecord], totals: Totals) -> list[str]:
    """Where a complete manifest's totals differ from what its layout and shard table add up to."""
    data_bytes = sum(s.bytes for s in shards)
    expected = {"sequences": layout.num_sequences, "tokens": layout.num_tokens, "data_bytes": data_bytes,
                "content_sha256": store_content_digest(shards)}
    problems = [f"totals.{name} is {getattr(totals, name)!r}, the shard table adds up to {value!r}"
                for name, value in expected.items() if getattr(totals, name) != value]
    derived = {"bytes_per_token": data_bytes / max(layout.num_tokens, 1),
               "teacher_ce": teacher_cross_entropy(shards).get("teacher_ce")}
    for name, value in derived.items():
        recorded = getattr(totals, name)
        if (recorded is None) != (value is None) or (value is not None and not math.isclose(recorded, value, rel_tol=1e-9)):
            problems.append(f"totals.{name} is {recorded!r}, the shard table gives {value!r}")
    return problems


def _some(values: list[int], total: int, most: int = 8) -> str:
    """The first ``most`` of ``values``, and how many more of ``total`` there are."""
    shown = ", ".join(map(str, values[:most]))
    return shown + (f" and {total - min(most, len(values))} more" if total > min(most, len(values)) else "")


# ---- shard bytes -----------------------------------------------------------------------------------

def array_limit(encoding: Encoding, seq_len: int, count: int, name: str) -> tuple[tuple[int, ...] | None, int]:
    """(exact shape or None, most elements) of the on-disk array ``name`` of a shard of ``count``
    sequences: a format checks what its metadata declares against this before reading the array.

    ``name`` is a column, or ``<ragged column>_offsets``."""
    if name.endswith("_offsets"):
        return (count + 1,), count + 1
    if name == DOCUMENT_STARTS:
        return None, count * max(seq_len - 1, 0)
    if name in RAGGED:
        entries = count * seq_len * encoding.k
        if name == "target_ids" and encoding.ids == "bitpack":
            entries = count * -(-seq_len * encoding.k * encoding.bits // 8)
        return None, entries
    return (count, seq_len), count * seq_len


def column_problem(encoding: Encoding, seq_len: int, count: int, columns: dict) -> str | None:
    """What is wrong with a shard's loaded ``columns`` (on-disk dtypes), or None: every column there,
    in its dtype and shape, lengths within 1..k, offsets that start at 0, never decrease, end at the
    entries there are, and give each sequence the entries its lengths say; document starts inside
    1..L-1 and increasing within each sequence. Run before decoding, so damaged bytes are reported
    instead of sized into an allocation."""
    for name in encoding.columns:
        if name not in columns:
            return f"has no {name} column"
        value = columns[name]
        if isinstance(value, Ragged) != (name in encoding.ragged_columns):
            return f"has a {name} column of the wrong kind"
        array = value.values if isinstance(value, Ragged) else value
        if array.dtype != encoding.dtype(name):
            return f"has {name} in {array.dtype}, the manifest says {encoding.dtype(name)}"
        if not isinstance(value, Ragged) and value.shape != (count, seq_len):
            return f"has {name} of shape {value.shape}, expected {(count, seq_len)}"
    if encoding.fixed_length:
        entries = np.full(count, seq_len * encoding.k, dtype=np.int64)
    else:
        lengths = columns["target_lengths"]
        if lengths.size and (lengths.min() < encoding.smallest_length or lengths.max() > encoding.k):
            return f"has target_lengths outside {encoding.smallest_length}..{encoding.k}"
        entries = lengths.sum(axis=1, dtype=np.int64)
    for name in RAGGED:
        values, offsets = columns[name]
        want = entries
        if name == "target_ids" and encoding.ids == "bitpack":
            want = (entries * encoding.bits + 7) // 8
        if offsets.shape != (count + 1,) or not np.issubdtype(offsets.dtype, np.integer):
            return f"has {name} offsets of shape {offsets.shape} ({offsets.dtype}), expected ({count + 1},) integers"
        if offsets[0] != 0 or offsets[-1] != len(values) or not np.array_equal(np.diff(offsets), want):
            return f"has {name} offsets that disagree with its lengths"
    if encoding.documents and (problem := _starts_problem(columns[DOCUMENT_STARTS], count, seq_len)):
        return problem
    if columns["input_ids"].size and int(columns["input_ids"].max()) >= encoding.vocab_size:
        return f"has input ids outside the vocabulary of {encoding.vocab_size}"
    return None


def loaded_columns(encoding: Encoding, seq_len: int, count: int, columns: dict) -> dict:
    """A shard's ``columns`` as a format's reader loaded them, checked (:func:`column_problem`) and as
    the rest of softcache takes them (softcache.store.encoding.from_disk); a :class:`StoreError`
    naming what is wrong otherwise."""
    if problem := column_problem(encoding, seq_len, count, columns):
        raise StoreError(problem)
    try:
        return from_disk(encoding, columns)
    except ValueError as err:
        raise StoreError(str(err)) from None


def _starts_problem(starts: Ragged, count: int, seq_len: int) -> str | None:
    values, offsets = starts
    if offsets.shape != (count + 1,) or not np.issubdtype(offsets.dtype, np.integer):
        return f"has {DOCUMENT_STARTS} offsets of shape {offsets.shape} ({offsets.dtype}), expected ({count + 1},) integers"
    sizes = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != len(values) or (sizes < 0).any() or (sizes > seq_len - 1).any():
        return f"has {DOCUMENT_STARTS} offsets that disagree with its entries"
    if len(values) and (int(values.min()) < 1 or int(values.max()) > seq_len - 1):
        return f"has {DOCUMENT_STARTS} outside 1..{seq_len - 1}"
    steps = np.diff(values.astype(np.int64))
    inside = np.ones(len(steps), dtype=bool)  # consecutive entries of one sequence
    inside[(offsets[1:-1] - 1)[(offsets[1:-1] > 0) & (offsets[1:-1] < len(values))]] = False
    if (steps[inside] <= 0).any():
        return f"has {DOCUMENT_STARTS} that do not increase within a sequence"
    return None


def decoded_problem(encoding: Encoding, ids: np.ndarray, logprobs: np.ndarray) -> str | None:
    """What is wrong with decoded targets (ids outside the vocabulary, NaN log-probabilities), or None."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= encoding.vocab_size):
        return f"decodes to target ids outside the vocabulary of {encoding.vocab_size}"
    if np.isnan(logprobs).any():
        return "decodes to NaN log-probabilities"
    return None
