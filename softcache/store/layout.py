"""The shape of a store's data, shared by every format.

A store holds ``num_sequences`` packed sequences of ``seq_len`` tokens. For each one it keeps three
arrays: ``input_ids`` [seq_len], ``target_ids`` [seq_len, k] and ``target_logprobs`` [seq_len, k].
Sequences are split into shards of ``shard_size`` consecutive sequences (the last may be shorter):
a shard is the unit of writing, checksumming and resuming, and exactly one writer owns it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

ARRAYS = ("input_ids", "target_ids", "target_logprobs")
UINT16_VOCAB = 1 << 16


def id_dtype_for(vocab_size: int) -> str:
    """Smallest id dtype for ``vocab_size``: uint16 up to 65,536 ids, else int32 (no vocab cap)."""
    return "uint16" if vocab_size <= UINT16_VOCAB else "int32"


@dataclass(frozen=True)
class Layout:
    """Array shapes, dtypes and shard boundaries of one store."""

    num_sequences: int
    seq_len: int
    k: int
    shard_size: int
    id_dtype: str
    """Dtype of input_ids and target_ids on disk (uint16 or int32)."""
    value_dtype: str = "float16"
    """Dtype of target_logprobs on disk."""

    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // self.shard_size)

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.seq_len

    def shard_bounds(self, index: int) -> tuple[int, int]:
        """(first sequence, sequence count) of shard ``index``."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} outside 0..{self.num_shards - 1}")
        first = index * self.shard_size
        return first, min(self.shard_size, self.num_sequences - first)

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one sequence's entry in array ``name``."""
        return (self.seq_len,) if name == "input_ids" else (self.seq_len, self.k)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.value_dtype if name == "target_logprobs" else self.id_dtype)

    def empty_shard(self, count: int) -> dict[str, np.ndarray]:
        """Zeroed host buffers for ``count`` sequences, in on-disk dtypes."""
        return {name: np.zeros((count, *self.row_shape(name)), dtype=self.dtype(name)) for name in ARRAYS}

    def check_shard(self, arrays: dict[str, np.ndarray], count: int) -> None:
        for name in ARRAYS:
            expected = (count, *self.row_shape(name))
            assert arrays[name].shape == expected, f"{name}: {arrays[name].shape} != {expected}"
            assert arrays[name].dtype == self.dtype(name), f"{name}: {arrays[name].dtype} != {self.dtype(name)}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
