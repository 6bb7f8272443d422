"""The shape of a store's data, shared by every format.

A store holds ``num_sequences`` packed sequences of ``seq_len`` tokens, split into shards of
``shard_size`` consecutive sequences (the last may be shorter): a shard is the unit of writing,
checksumming and resuming, and exactly one writer owns it. What each sequence's targets are and
how they are coded is the :class:`~softcache.store.encoding.Encoding`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Sequence count, sequence length and shard boundaries of one store."""

    num_sequences: int
    seq_len: int
    shard_size: int

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
