"""Reading and verifying a store, whatever its format.

:class:`Store` maps sequence numbers to shards through the manifest's shard table and returns
numpy arrays. A store whose teacher job has not finished is refused unless the caller asks for
its complete part (``allow_incomplete=True``), which then reads only shards with a progress record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softcache.errors import StoreError
from softcache.store.files import check_file
from softcache.store.layout import ARRAYS, Layout
from softcache.store.manifest import TOKENIZER_DIR, read_manifest, read_progress
from softcache.store.registry import make_format

_RETURN_DTYPES = {"input_ids": np.int64, "target_ids": np.int64, "target_logprobs": np.float32}


class Store:
    """A store opened for reading. ``len(store)`` is the number of readable sequences."""

    def __init__(self, root: str | Path, allow_incomplete: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.layout = Layout.from_dict(self.manifest["layout"])
        self.format = make_format(self.manifest["storage"])
        if self.manifest["complete"]:
            self.shards = list(self.manifest["shards"])
        else:
            records = read_progress(self.root)
            if not allow_incomplete:
                raise StoreError(
                    f"{self.root} is incomplete: its teacher job has not finished "
                    f"({len(records)} of {self.layout.num_shards} shards written); rerun the same "
                    "softcache cache command to finish it, or read the finished part on purpose "
                    "(softcache train --allow-incomplete; open_store(..., allow_incomplete=True))"
                )
            self.shards = [records[i] for i in sorted(records)]
        self._ends = np.cumsum([s["count"] for s in self.shards], dtype=np.int64)
        self._reader = None

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def tokenizer_path(self) -> Path:
        """Directory with the teacher's tokenizer files (loadable with AutoTokenizer)."""
        return self.root / TOKENIZER_DIR

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"Store({str(self.root)!r}, {self.format.name}, {len(self)} sequences, {state})"

    def read_raw(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Sequences [start, stop) in their on-disk dtypes (views where the format allows)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) outside the store's {len(self)} sequences")
        if self._reader is None:
            self._reader = self.format.reader(self.root, self.layout)
        pieces = {name: [] for name in ARRAYS}
        position = start
        while position < stop:
            slot = int(np.searchsorted(self._ends, position, side="right"))
            shard = self.shards[slot]
            slot_start = int(self._ends[slot]) - shard["count"]
            take = min(stop, int(self._ends[slot])) - position
            lo = shard["first"] + position - slot_start
            part = self._reader.read(shard["index"], lo, lo + take)
            for name in ARRAYS:
                pieces[name].append(part[name])
            position += take
        if start == stop:
            return self.layout.empty_shard(0)
        return {name: arrays[0] if len(arrays) == 1 else np.concatenate(arrays) for name, arrays in pieces.items()}

    def read_rows(self, indices) -> dict[str, np.ndarray]:
        """Sequences at ``indices`` (any order), in :meth:`read`'s dtypes, converted while gathered."""
        return self.read_rows_raw(indices, dtypes=_RETURN_DTYPES)

    def read_rows_raw(self, indices, dtypes: dict | None = None) -> dict[str, np.ndarray]:
        """Sequences at ``indices`` (any order, repeats allowed) in on-disk dtypes (or ``dtypes``), in
        that order.

        Rows are grouped by shard and each shard is read once, so a batch drawn from a few shards
        costs a few reads."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sequence index outside the store's {len(self)} sequences")
        if self._reader is None:
            self._reader = self.format.reader(self.root, self.layout)
        out = {name: np.empty((len(indices), *self.layout.row_shape(name)),
                              (dtypes or {}).get(name, self.layout.dtype(name))) for name in ARRAYS}
        slots = np.searchsorted(self._ends, indices, side="right")
        for slot in np.unique(slots):
            where = np.nonzero(slots == slot)[0]
            shard = self.shards[slot]
            rows = shard["first"] + indices[where] - (int(self._ends[slot]) - shard["count"])
            unique, inverse = np.unique(rows, return_inverse=True)
            part = self._reader.read_rows(shard["index"], unique)
            for name in ARRAYS:
                out[name][where] = part[name][inverse]
        return out

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Sequences [start, stop): ``input_ids`` [n, L] int64, ``target_ids`` [n, L, k] int64,
        ``target_logprobs`` [n, L, k] float32 (natural-log probabilities over the full vocabulary)."""
        raw = self.read_raw(start, stop)
        return {name: raw[name].astype(_RETURN_DTYPES[name]) for name in ARRAYS}

    def verify(self) -> list[str]:
        """Recompute every checksum; return one line per problem (empty: the store is intact)."""
        problems = []
        if not self.complete:
            problems.append(f"store is incomplete: {len(self.shards)} of {self.layout.num_shards} shards written")
        for shard in self.shards:
            for entry in shard["files"]:
                problem = check_file(self.root, entry)
                if problem:
                    problems.append(f"shard {shard['index']}: {entry['path']} {problem}")
        for entry in self.manifest.get("files", []):
            problem = check_file(self.root, entry)
            if problem:
                problems.append(f"{entry['path']} {problem}")
        return problems


def open_store(root: str | Path, allow_incomplete: bool = False) -> Store:
    """Open the store at ``root`` for reading (either format)."""
    return Store(root, allow_incomplete=allow_incomplete)
