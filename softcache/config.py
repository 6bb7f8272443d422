"""Typed configuration of the teacher job.

One dataclass per concern. Every field maps to one ``softcache cache`` flag, and validation errors
name that flag, so the same message serves the CLI and the Python API. The resolved configuration
is saved in every store's manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from softcache.errors import SoftcacheError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class CacheConfig:
    """Everything ``softcache cache`` needs; see ``softcache cache --help`` for the user's view."""

    teacher: str
    """--teacher: a Hugging Face hub id, a local model directory, or ``builtin:smollm2``."""
    data: str
    """--data: a corpus file or directory readable by ``datasets``, or ``builtin:python-docs``."""
    out: str
    """--out: the store directory to create or resume."""
    format: str = "zarr"
    """--format: on-disk format, a key of ``softcache.store.FORMATS``."""
    gguf_file: str | None = None
    """--gguf-file: file name of a GGUF checkpoint inside the --teacher directory."""
    text_column: str = "text"
    """--text-column: column holding the documents' text."""
    split: str = "train"
    """--split: split to read when the corpus has several."""
    seq_len: int = 1024
    """--seq-len: tokens per packed sequence."""
    max_sequences: int | None = None
    """--max-sequences: keep only the first N packed sequences (None: all)."""
    k: int = 64
    """--k: cached entries per position (top-k log-probabilities)."""
    temperature: float = 1.0
    """--temperature: the teacher's logits are divided by this before normalising."""
    batch_size: int = 8
    """--batch-size: sequences per teacher forward pass."""
    shard_size: int = 256
    """--shard-size: sequences per shard (the unit of writing, checksumming and resuming)."""
    device: str = "auto"
    """--device: auto (cuda when available), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """--dtype: teacher weights' dtype; auto is bfloat16 on CUDA and float32 on CPU."""
    progress: bool = True
    """--progress/--no-progress: show a progress bar on stderr."""

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        from softcache.store import FORMATS

        if not self.teacher:
            raise SoftcacheError("--teacher is required: a hub id, a model directory or builtin:smollm2")
        if not self.data:
            raise SoftcacheError("--data is required: a corpus file or directory, or builtin:python-docs")
        if not self.out:
            raise SoftcacheError("--out is required: the store directory to write")
        if self.format not in FORMATS:
            raise SoftcacheError(f"--format must be one of {', '.join(sorted(FORMATS))}, got {self.format!r}")
        if self.seq_len < 2:
            raise SoftcacheError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise SoftcacheError(f"--max-sequences must be at least 1, got {self.max_sequences}")
        if self.k < 1:
            raise SoftcacheError(f"--k must be at least 1, got {self.k}")
        if not self.temperature > 0:  # also rejects NaN
            raise SoftcacheError(f"--temperature must be greater than 0, got {self.temperature}")
        if self.batch_size < 1:
            raise SoftcacheError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.shard_size < 1:
            raise SoftcacheError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.dtype not in DTYPES:
            raise SoftcacheError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise SoftcacheError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the store")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
