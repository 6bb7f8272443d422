"""How a store's targets become bytes, and back: target kinds, id codes and value codes.

Every position keeps between 1 and ``k`` entries (id, value). In memory, targets are *padded*:
``ids`` [..., k] int64 and ``logprobs`` [..., k] float32, where a position with n < k entries has
its real entries in slots 0..n-1 and padding after them. Padding repeats the id of slot 0 and has
log-probability -inf (probability 0), so a padded row is still a valid sparse distribution for the
losses. Slot 0 is always a real entry.

On disk, per sequence, there are *fixed* columns of ``seq_len`` values (``input_ids``, and when
needed ``target_lengths`` and ``target_tail``) and *ragged* columns holding only the real entries,
position after position (``target_ids``, ``target_values``), with per-sequence offsets: a
:class:`Ragged` pair. Nothing is stored for padding.

Two options serve chat and instruction corpora (softcache.documents):

- ``masked``: only some positions teach (an assistant's tokens, not the prompt's). Every position
  then has a ``target_lengths`` entry, 0 where it does not teach, and the ragged columns hold
  nothing for it: a masked position costs its ``input_ids`` and length, never target bytes.
  Decoded, such a position is a point mass on id 0 (finite, so a loss that masks it stays finite)
  and ``teach`` says which positions are real.
- ``documents``: rows hold several documents that must not see each other; the ragged
  ``document_starts`` column lists, per sequence, the positions (after 0) where a document starts.

What the targets mean is their kind (softcache.kinds.TARGET_KINDS: top-k, top-p, sampled): the
kind says whether every position keeps exactly k entries (then no lengths column is stored) and
which value codes can hold it.

Id codes (``ids``):
- ``plain``: ids in uint16 (vocabularies up to 65,536) or int32.
- ``delta``: each position's ids sorted ascending, stored as the first id and then the gaps, in
  the same dtype as plain; small gaps are what the format's compressor then shrinks.
- ``bitpack``: ids at ceil(log2 V) bits each, each sequence starting on a byte boundary (for large
  vocabularies, where plain needs 32 bits: 18 bits for V = 151,936).
- ``ranked``: as ``delta``, but of each id's rank in its shard's ranking instead of the id: the
  vocabulary ordered by how often each id occurs in the shard's own input ids, most often first
  (ties, and the ids that never occur, in id order). The reader rebuilds the ranking from the
  ``input_ids`` column, so it costs no bytes, and the ids a teacher predicts are mostly frequent ones:
  small ranks, smaller gaps (9-10% smaller sampled stores of SmolLM2's targets,
  benchmarks/results/encodings.md). The ranking is a shard's, so :func:`to_disk` applies it when a
  shard is written and :func:`from_disk` takes it off when one is loaded: in memory (what
  :func:`encode` returns and :func:`decode` and the content digest take) a ranked store's columns are
  exactly those of ``delta``.

Value codes (``values``):
- ``float16``: log-probabilities (normalised over the full vocabulary) in float16. The tail mass
  1 - sum(exp(values)) is implied.
- ``log8``: one byte per entry, ``round((top - logprob) / LOG8_STEP)`` clipped to 255, where top is
  the position's largest log-probability; plus the position's log tail mass in float16
  (``target_tail``). Decoding renormalises the head to 1 - tail, so the tail stays exact and the
  head is off by at most LOG8_STEP / 2 nats per entry before renormalisation (entries more than
  255 x LOG8_STEP = 20 nats below the top are raised to that floor).
- ``counts``: sampled targets' draw counts, in the smallest unsigned type that holds ``samples``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from softcache.kinds import TARGET_KINDS

ID_CODES = ("plain", "delta", "bitpack", "ranked")
SORTED_IDS = ("delta", "ranked")
"""Id codes that keep each position's entries in ascending id order in memory, as first id and gaps."""
VALUE_CODES = ("float16", "log8", "counts")
LOG8_STEP = 20.0 / 255
FLOAT16_MIN = float(np.finfo(np.float16).min)
UINT16_VOCAB = 1 << 16

FIXED = ("input_ids", "target_lengths", "target_tail")
RAGGED = ("target_ids", "target_values")
"""Ragged columns of target entries (their sizes follow ``target_lengths``)."""
DOCUMENT_STARTS = "document_starts"
"""Ragged column of a ``documents`` store: per sequence, the positions after 0 where a document starts."""


def id_dtype_for(vocab_size: int) -> str:
    """Smallest id dtype for ``vocab_size``: uint16 up to 65,536 ids, else int32 (no vocab cap)."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "int32"


def _uint_for(largest: int) -> str:
    for dtype in ("uint8", "uint16", "uint32"):
        if largest <= np.iinfo(dtype).max:
            return dtype
    return "uint64"


@dataclass(frozen=True)
class Encoding:
    """What the targets are and how they are coded; saved as the manifest's ``encoding`` section."""

    kind: str
    """A key of softcache.kinds.TARGET_KINDS."""
    k: int
    """Entries per position: exactly k for a fixed-length kind (topk), else at most k."""
    vocab_size: int
    ids: str = "plain"
    values: str = "float16"
    samples: int | None = None
    """Draws per position (sampled targets only)."""
    masked: bool = False
    """Only some positions hold targets (``target_lengths`` 0 elsewhere); see the module docstring."""
    documents: bool = False
    """Sequences hold several documents, their starts in ``document_starts``."""

    def __post_init__(self):
        assert self.kind in TARGET_KINDS and self.ids in ID_CODES and self.values in VALUE_CODES, self
        assert self.values in TARGET_KINDS[self.kind].value_codes, f"{self.kind} targets cannot be stored as {self.values}"
        assert (self.values == "counts") == (self.samples is not None), "counts need the number of draws"
        assert 1 <= self.k <= self.vocab_size

    @property
    def fixed_length(self) -> bool:
        """Every position holds exactly k entries (a fixed-length kind in a store that is not masked)."""
        return TARGET_KINDS[self.kind].fixed_length and not self.masked

    @property
    def smallest_length(self) -> int:
        """Fewest entries a position may hold: 0 in a masked store, else 1."""
        return 0 if self.masked else 1

    @property
    def bits(self) -> int:
        """Bits per id for ``bitpack``."""
        return max(1, math.ceil(math.log2(self.vocab_size)))

    def dtype(self, column: str) -> np.dtype:
        if column == "input_ids":
            return np.dtype(id_dtype_for(self.vocab_size))
        if column == "target_lengths":
            return np.dtype(_uint_for(self.k))
        if column == "target_tail":
            return np.dtype("float16")
        if column == "target_ids":
            return np.dtype("uint8" if self.ids == "bitpack" else id_dtype_for(self.vocab_size))
        if column == "target_values":
            return np.dtype({"float16": "float16", "log8": "uint8"}.get(self.values) or _uint_for(self.samples))
        if column == DOCUMENT_STARTS:
            return np.dtype("uint32")
        raise KeyError(column)

    @property
    def fixed_columns(self) -> tuple[str, ...]:
        """Columns of seq_len values per sequence."""
        return ("input_ids",) + (() if self.fixed_length else ("target_lengths",)) + (
            ("target_tail",) if self.values == "log8" else ())

    @property
    def ragged_columns(self) -> tuple[str, ...]:
        """Columns of a variable number of values per sequence (:class:`Ragged`)."""
        return RAGGED + ((DOCUMENT_STARTS,) if self.documents else ())

    @property
    def columns(self) -> tuple[str, ...]:
        return self.fixed_columns + self.ragged_columns

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for option in ("masked", "documents"):  # a plain-text store's section is what it always was
            if not data[option]:
                del data[option]
        data["dtypes"] = {name: str(self.dtype(name)) for name in self.columns}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Encoding:
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls) if f.name in data})


# ---- columns: fixed arrays [n, L] and ragged (values, offsets[n + 1]) per sequence --------------

class Ragged(NamedTuple):
    """A ragged column of n sequences: their entries one after another, and where each one starts."""

    values: np.ndarray
    """[total] entries in the column's on-disk dtype (bitpacked ids: the packed bytes, uint8)."""
    offsets: np.ndarray
    """[n + 1] int64: sequence i's entries (bitpacked: bytes) are ``values[offsets[i]:offsets[i + 1]]``."""


def take(columns: dict, rows: np.ndarray) -> dict:
    """The columns of sequences ``rows`` (positions inside ``columns``, any order, repeats allowed)."""
    out = {}
    for name, value in columns.items():
        if isinstance(value, Ragged):
            flat, offsets = value
            starts, stops = offsets[rows], offsets[rows + 1]
            sizes = stops - starts
            new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(sizes, out=new_offsets[1:])
            index = np.arange(new_offsets[-1], dtype=np.int64) + np.repeat(starts - new_offsets[:-1], sizes)
            out[name] = Ragged(flat[index], new_offsets)
        else:
            out[name] = value[rows]
    return out


def concat(parts: list[dict]) -> dict:
    """Columns of consecutive groups of sequences joined into one."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name, value in parts[0].items():
        if isinstance(value, Ragged):
            flats = [p[name].values for p in parts]
            shifts = np.cumsum([0] + [len(f) for f in flats[:-1]])
            offsets = np.concatenate([[0]] + [p[name].offsets[1:] + s for p, s in zip(parts, shifts)]).astype(np.int64)
            out[name] = Ragged(np.concatenate(flats), offsets)
        else:
            out[name] = np.concatenate([p[name] for p in parts])
    return out


def num_rows(columns: dict) -> int:
    return len(columns["input_ids"])


# ---- encoding ------------------------------------------------------------------------------------

def encode(encoding: Encoding, input_ids: np.ndarray, ids: np.ndarray, values: np.ndarray,
           lengths: np.ndarray | None = None, log_tail: np.ndarray | None = None,
           teach: np.ndarray | None = None, segments: np.ndarray | None = None) -> dict:
    """Columns for a group of sequences.

    Args:
        input_ids: [S, L] token ids.
        ids: [S, L, k] padded target ids (real entries first).
        values: [S, L, k] float log-probabilities, or integer counts for sampled targets.
        lengths: [S, L] real entries per position (None: all k).
        log_tail: [S, L] log of the mass outside the entries (needed by ``log8``; computed from
            ``values`` when None).
        teach: [S, L] bool, the positions that keep their targets (a ``masked`` encoding only).
        segments: [S, L] integer document numbers, changing where a document starts (a ``documents``
            encoding only).
    """
    s, length, k = ids.shape
    assert k == encoding.k, f"targets have {k} entries per position, the encoding {encoding.k}"
    assert (teach is not None) == encoding.masked, "a masked encoding needs the teach mask, and only it"
    assert (segments is not None) == encoding.documents, "a documents encoding needs the segments, and only it"
    if lengths is None:
        lengths = np.full((s, length), k, dtype=np.int64)
    lengths = lengths.astype(np.int64)
    if lengths.min(initial=1) < 1 or lengths.max(initial=1) > k:
        raise ValueError("every position needs between 1 and k entries")
    if teach is not None:
        lengths = np.where(np.asarray(teach, dtype=bool), lengths, 0)
    valid = np.arange(k) < lengths[..., None]
    ids = ids.astype(np.int64)
    if encoding.ids in SORTED_IDS:
        order = np.argsort(np.where(valid, ids, np.iinfo(np.int64).max), axis=-1, kind="stable")
        ids = np.take_along_axis(ids, order, -1)
        values = np.take_along_axis(values, order, -1)
    per_sequence = lengths.sum(-1)
    entry_offsets = np.zeros(s + 1, dtype=np.int64)
    np.cumsum(per_sequence, out=entry_offsets[1:])
    columns = {"input_ids": input_ids.astype(encoding.dtype("input_ids"))}
    if not encoding.fixed_length:
        columns["target_lengths"] = lengths.astype(encoding.dtype("target_lengths"))
    if encoding.values == "log8":
        if log_tail is None:
            log_tail = _log1mexp(np.minimum(_logsumexp(np.where(valid, values, -np.inf)), 0.0))
        log_tail = np.where(lengths > 0, log_tail, 0.0)  # nothing stored: all the mass is outside
        columns["target_tail"] = np.asarray(log_tail, dtype=np.float64).astype(np.float16)
    columns["target_ids"] = _encode_ids(encoding, ids, valid, per_sequence, entry_offsets)
    columns["target_values"] = Ragged(_encode_values(encoding, values, valid), entry_offsets)
    if segments is not None:
        columns[DOCUMENT_STARTS] = starts_of(np.asarray(segments))
    return columns


def starts_of(segments: np.ndarray) -> Ragged:
    """The ``document_starts`` column of [S, L] document numbers: per sequence, where they change."""
    changes = segments[:, 1:] != segments[:, :-1]
    rows, positions = np.nonzero(changes)
    offsets = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(changes.sum(axis=1), out=offsets[1:])
    return Ragged((positions + 1).astype(np.uint32), offsets)


def segments_of(starts: Ragged, length: int) -> np.ndarray:
    """[S, L] int32 document numbers (0 from position 0, one more at each start) of a ``document_starts`` column."""
    values, offsets = starts
    flags = np.zeros((len(offsets) - 1, length), dtype=np.int32)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    flags[rows, values.astype(np.int64)] = 1
    return np.cumsum(flags, axis=1, dtype=np.int32)


def _encode_ids(encoding: Encoding, ids: np.ndarray, valid: np.ndarray, per_sequence, entry_offsets) -> Ragged:
    if encoding.ids in SORTED_IDS:
        previous = np.concatenate([np.zeros_like(ids[..., :1]), ids[..., :-1]], axis=-1)
        return Ragged((ids - previous)[valid].astype(encoding.dtype("target_ids")), entry_offsets)
    if encoding.ids == "plain":
        return Ragged(ids[valid].astype(encoding.dtype("target_ids")), entry_offsets)
    bits = encoding.bits
    flat = ids[valid].astype(np.uint64)
    sizes = (per_sequence * bits + 7) // 8
    byte_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=byte_offsets[1:])
    sequence = np.repeat(np.arange(len(per_sequence)), per_sequence)
    local = np.arange(len(flat), dtype=np.int64) - entry_offsets[sequence]
    start_bit = byte_offsets[sequence] * 8 + local * bits
    # Each id's bits as a row, least significant first, placed at its bit position.
    id_bits = ((flat[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    stream = np.zeros(int(byte_offsets[-1]) * 8, dtype=np.uint8)
    stream[(start_bit[:, None] + np.arange(bits)).reshape(-1)] = id_bits.reshape(-1)
    return Ragged(np.packbits(stream, bitorder="little"), byte_offsets)


def _encode_values(encoding: Encoding, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if encoding.values == "counts":
        return values[valid].astype(encoding.dtype("target_values"))
    values = values.astype(np.float32)
    if encoding.values == "float16":
        return np.maximum(values[valid], FLOAT16_MIN).astype(np.float16)
    top = np.where(valid, values, -np.inf).max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # -inf - -inf where a position stores nothing: never kept
        code = np.clip(np.rint((top - values) / LOG8_STEP), 0, 255)
    return code[valid].astype(np.uint8)


# ---- decoding ------------------------------------------------------------------------------------

def decode(encoding: Encoding, columns: dict) -> tuple[np.ndarray, np.ndarray]:
    """Padded ``(ids [n, L, k] int64, logprobs [n, L, k] float32)`` of the columns' sequences. A
    position of a masked store that holds nothing decodes to a point mass on id 0."""
    n, length = columns["input_ids"].shape
    k = encoding.k
    lengths = position_lengths(encoding, columns)
    held = np.flatnonzero(lengths) if encoding.masked else None
    if held is not None:
        lengths = lengths[held]
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    ids = _decode_ids(encoding, columns["target_ids"], columns["target_values"].offsets, lengths, starts)
    log_tail = None
    if encoding.values == "log8":
        log_tail = columns["target_tail"].reshape(-1)
        log_tail = log_tail if held is None else log_tail[held]
    logprobs = _decode_values(encoding, columns["target_values"].values, log_tail, lengths, starts)
    if encoding.fixed_length:
        return ids.reshape(n, length, k), logprobs.reshape(n, length, k)
    out_ids = np.repeat(ids[starts][:, None], k, axis=1) if len(ids) else np.zeros((0, k), dtype=np.int64)
    out_values = np.full((len(lengths), k), -np.inf, dtype=np.float32)
    position = np.repeat(np.arange(len(lengths)), lengths)
    slot = np.arange(len(ids), dtype=np.int64) - starts[position]
    out_ids[position, slot] = ids
    out_values[position, slot] = logprobs
    if held is not None:
        all_ids = np.zeros((n * length, k), dtype=np.int64)
        all_values = np.full((n * length, k), -np.inf, dtype=np.float32)
        all_values[:, 0] = 0.0
        all_ids[held], all_values[held] = out_ids, out_values
        out_ids, out_values = all_ids, all_values
    return out_ids.reshape(n, length, k), out_values.reshape(n, length, k)


def _decode_ids(encoding: Encoding, column: Ragged, entry_offsets, lengths, starts) -> np.ndarray:
    flat, offsets = column
    if encoding.ids == "plain":
        return flat.astype(np.int64)
    if encoding.ids in SORTED_IDS:
        return _undo_gaps(flat, starts, lengths)
    bits = encoding.bits
    per_sequence = np.diff(entry_offsets)
    sequence = np.repeat(np.arange(len(per_sequence)), per_sequence)
    local = np.arange(int(entry_offsets[-1]), dtype=np.int64) - entry_offsets[:-1][sequence]
    start_bit = offsets[:-1][sequence] * 8 + local * bits
    padded = np.concatenate([flat, np.zeros(8, dtype=np.uint8)]).astype(np.uint64)
    byte = start_bit >> 3
    word = np.zeros(len(byte), dtype=np.uint64)
    for j in range(-(-(bits + 7) // 8)):  # enough bytes to cover bits plus a shift of up to 7
        word |= padded[byte + j] << np.uint64(8 * j)
    return ((word >> (start_bit & 7).astype(np.uint64)) & np.uint64((1 << bits) - 1)).astype(np.int64)


def _decode_values(encoding: Encoding, flat: np.ndarray, log_tail: np.ndarray | None, lengths, starts) -> np.ndarray:
    if encoding.values == "float16":
        return flat.astype(np.float32)
    if encoding.values == "counts":
        return np.log(flat.astype(np.float32) / encoding.samples)
    relative = flat.astype(np.float32) * np.float32(-LOG8_STEP)
    head = np.add.reduceat(np.exp(relative, dtype=np.float64), starts) if len(flat) else np.zeros(0)
    log_tail = log_tail.astype(np.float64)
    shift = _log1mexp(np.minimum(log_tail, 0.0)) - np.log(head)  # head mass 1 - tail, exactly
    return (relative + np.repeat(shift, lengths)).astype(np.float32)


def _undo_gaps(gaps: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The int64 values of positions coded as first value and gaps, each position's ``lengths`` entries
    from its ``starts`` on (every position holds at least one entry)."""
    total = np.cumsum(gaps, dtype=np.int64)
    before = total[starts] - gaps[starts].astype(np.int64)  # running sum before each position
    return total - np.repeat(before, lengths)


def position_lengths(encoding: Encoding, columns: dict) -> np.ndarray:
    """[n * L] int64 entries each position of the columns holds (0 for a masked store's untaught ones)."""
    if encoding.fixed_length:
        return np.full(columns["input_ids"].size, encoding.k, dtype=np.int64)
    return columns["target_lengths"].reshape(-1).astype(np.int64)


# ---- the ranked id code: applied to a whole shard as it is written, taken off as it is loaded ------

def shard_ranking(vocab_size: int, input_ids: np.ndarray) -> np.ndarray:
    """[V] int64: the vocabulary ordered by each id's count in ``input_ids``, most often first, ties in id order."""
    counts = np.bincount(input_ids.reshape(-1).astype(np.int64), minlength=vocab_size)
    return np.argsort(-counts, kind="stable")


def to_disk(encoding: Encoding, columns: dict) -> dict:
    """A shard's columns as its files hold them: for ``ranked`` ids, each position's ids replaced by their
    ranks in the shard's ranking and sorted again, its values moved with them; the columns themselves for
    any other code."""
    if encoding.ids != "ranked":
        return columns
    ranking = shard_ranking(encoding.vocab_size, columns["input_ids"])
    rank_of = np.empty_like(ranking)
    rank_of[ranking] = np.arange(len(ranking))
    return _recoded(encoding, columns, rank_of)


def from_disk(encoding: Encoding, columns: dict) -> dict:
    """The inverse of :func:`to_disk`, on a shard's loaded columns (already checked by
    softcache.store.consistency.column_problem). Raises ValueError where a rank falls outside the
    vocabulary: damaged bytes."""
    if encoding.ids != "ranked":
        return columns
    return _recoded(encoding, columns, shard_ranking(encoding.vocab_size, columns["input_ids"]))


def _recoded(encoding: Encoding, columns: dict, mapping: np.ndarray) -> dict:
    """The columns with every stored id (or rank) x replaced by ``mapping[x]``, each position's entries
    sorted again and coded as first and gaps, and its values in the same new order."""
    lengths = position_lengths(encoding, columns)
    lengths = lengths[lengths > 0]
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    gaps, offsets = columns["target_ids"]
    values = columns["target_values"]
    stored = _undo_gaps(gaps, starts, lengths)
    position = np.repeat(np.arange(len(lengths)), lengths)  # each entry's position
    vocab = encoding.vocab_size
    if stored.size and (stored.min() < 0 or stored.max() >= vocab):
        raise ValueError(f"has target_ids whose ranks fall outside the vocabulary of {vocab}")
    key = position * vocab + mapping[stored]  # sorting it keeps each entry in its position
    bits = 8 * values.values.dtype.itemsize
    if bits <= 16 and len(lengths) * vocab < 1 << (63 - bits):
        # The value rides in the key's low bits (room left in int64): a stable sort of nearly sorted keys
        # (fast) instead of an argsort.
        unsigned = np.dtype(f"uint{bits}")
        packed = np.sort((key << bits) | values.values.view(unsigned), kind="stable")
        mapped = (packed >> bits) - position * vocab
        moved = (packed & ((1 << bits) - 1)).astype(unsigned).view(values.values.dtype)
    else:
        order = np.argsort(key, kind="stable")
        mapped = key[order] - position * vocab
        moved = values.values[order]
    recoded = np.empty_like(mapped)
    recoded[1:] = mapped[1:] - mapped[:-1]
    recoded[starts] = mapped[starts]
    return {**columns, "target_ids": Ragged(recoded.astype(gaps.dtype), offsets),
            "target_values": Ragged(moved, values.offsets)}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    peak = x.max(-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(x - peak).sum(-1, keepdims=True)) + peak)[..., 0]


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0 (-inf at x = 0)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))
