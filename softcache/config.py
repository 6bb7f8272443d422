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
# --fused-linear auto: fuse on CPU only above this much float32 logits per micro-batch. On CPU the fused
# loss takes 10% of the memory but 1.3-1.5x the time of the unfused one (benchmarks/results/fused_loss.md).
FUSE_ABOVE_BYTES = 2 << 30
# Default id code, chosen by measurement (benchmarks/results/encodings.md); each target kind names its
# default value code (softcache.kinds).
DEFAULT_IDS = "delta"


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
    targets: str = "topk"
    """--targets: a key of ``softcache.kinds.TARGET_KINDS``: topk, topp (top-p-k) or sampled (unbiased draws
    with counts)."""
    k: int = 64
    """--k: entries per position (topk), or at most (topp)."""
    top_p: float = 0.95
    """--top-p: probability mass a topp position keeps (then at most --k ids)."""
    samples: int = 50
    """--samples: draws per position for sampled targets."""
    seed: int = 0
    """--seed: sampling seed; a sequence's draws depend only on it and the sequence's number."""
    ids: str | None = None
    """--ids: id code, plain, delta or bitpack (default: DEFAULT_IDS)."""
    values: str | None = None
    """--values: value code, float16 or log8 (topk/topp; default: the kind's first value code); counts for sampled."""
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
        from softcache.kinds import TARGET_KINDS
        from softcache.store.encoding import ID_CODES

        if self.targets not in TARGET_KINDS:
            raise SoftcacheError(f"--targets must be one of {', '.join(TARGET_KINDS)}, got {self.targets!r}")
        if self.k < 1:
            raise SoftcacheError(f"--k must be at least 1, got {self.k}")
        if not 0 < self.top_p <= 1:
            raise SoftcacheError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.samples < 1:
            raise SoftcacheError(f"--samples must be at least 1, got {self.samples}")
        if self.ids is not None and self.ids not in ID_CODES:
            raise SoftcacheError(f"--ids must be one of {', '.join(ID_CODES)}, got {self.ids!r}")
        allowed = sorted(TARGET_KINDS[self.targets].value_codes)
        if self.values is not None and self.values not in allowed:
            raise SoftcacheError(f"--values for --targets {self.targets} must be one of {', '.join(allowed)}, "
                                 f"got {self.values!r}")
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
        if "://" not in self.out and out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the store")

    def targets_section(self):
        """The manifest's :class:`~softcache.store.manifest.TargetsSection` these flags describe."""
        from softcache.store.manifest import TargetsSection

        return TargetsSection.for_kind(self.targets, self.temperature, k=self.k, top_p=self.top_p,
                                       samples=self.samples, seed=self.seed)

    def encoding(self, vocab_size: int):
        """The store's :class:`~softcache.store.encoding.Encoding` for a teacher with ``vocab_size`` ids."""
        from softcache.store.encoding import Encoding

        targets = self.targets_section()
        kind = targets.spec
        return Encoding(kind.name, kind.width(targets, vocab_size), vocab_size, self.ids or DEFAULT_IDS,
                        self.values or kind.value_codes[0], targets.samples)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Everything ``softcache train`` needs; see ``softcache train --help`` for the user's view."""

    store: str
    """--store: a complete store written by ``softcache cache``."""
    student: str
    """--student: a config.json (random init) or a model directory (its weights, if any, are loaded)."""
    out: str
    """--out: the run directory (checkpoints, metrics.jsonl, config.json, final/)."""
    steps: int | None = None
    """--steps: optimiser steps; with neither --steps nor --epochs, one epoch."""
    epochs: int | None = None
    """--epochs: passes over the training sequences (the step count is derived)."""
    batch_size: int = 8
    """--batch-size: sequences per micro-batch (per rank)."""
    grad_accum: int = 1
    """--grad-accum: micro-batches per optimiser step."""
    lr: float = 1e-3
    """--lr: peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """--min-lr-ratio: the cosine schedule ends at lr x this."""
    warmup_steps: int | None = None
    """--warmup-steps: linear warm-up steps (default: 5% of the steps)."""
    weight_decay: float = 0.1
    """--weight-decay: AdamW weight decay (not applied to biases and norms)."""
    clip_grad: float = 1.0
    """--clip-grad: maximum gradient norm (0: no clipping)."""
    alpha: float = 0.5
    """--alpha: loss = alpha x KD + (1 - alpha) x CE."""
    loss: str = "fkl"
    """--loss: fkl, rkl, jsd or tvd."""
    tail: str | None = None
    """--tail: bucket, renorm or none (mass outside the cached ids); default: the store's (bucket for
    top-k/top-p targets, none for sampled)."""
    temperature: float | None = None
    """--temperature: student temperature (default: the store's)."""
    beta: float = 0.5
    """--beta: JSD mixing weight."""
    seed: int = 0
    """--seed: student initialisation, data order and every other random choice."""
    eval_store: str | None = None
    """--eval-store: a held-out store to evaluate on."""
    eval_fraction: float = 0.0
    """--eval-fraction: hold out the last fraction of the training store's sequences instead."""
    eval_every: int = 0
    """--eval-every: evaluate every N steps (0: only at the end)."""
    checkpoint_every: int = 100
    """--checkpoint-every: write a checkpoint every N steps (and at the end)."""
    resume: bool = False
    """--resume: continue from the newest checkpoint in --out."""
    allow_tokenizer_mismatch: bool = False
    """--allow-tokenizer-mismatch: train a student whose tokenizer differs from the store's."""
    allow_incomplete: bool = False
    """--allow-incomplete: train on the finished shards of a store whose teacher job has not finished."""
    verify_shards: bool = True
    """--verify-shards/--no-verify-shards: check each shard's sha256 when first read."""
    num_workers: int = 1
    """--num-workers: DataLoader worker processes reading the store."""
    device: str = "auto"
    """--device: auto, cpu, cuda or cuda:N (bf16 autocast on CUDA)."""
    chunk_tokens: int = 256
    """--chunk-tokens: positions per chunk of the loss computation."""
    fused_linear: str = "auto"
    """--fused-linear: on, off or auto. On computes the loss from the hidden states and the output
    projection chunk by chunk, never materialising the [B, L, V] logits (when the model allows);
    auto turns it on on CUDA or when one micro-batch's float32 logits would exceed FUSE_ABOVE_BYTES."""
    progress: bool = True
    """--progress/--no-progress: progress bar on stderr."""

    @property
    def epochs_or_one(self) -> int:
        return self.epochs or 1

    def validate(self) -> None:
        from softcache.losses import DIVERGENCES, TAILS

        for flag, value in (("--store", self.store), ("--student", self.student), ("--out", self.out)):
            if not value:
                raise SoftcacheError(f"{flag} is required")
        if self.steps is not None and self.epochs is not None:
            raise SoftcacheError("give --steps or --epochs, not both")
        for flag, value in (("--steps", self.steps), ("--epochs", self.epochs)):
            if value is not None and value < 1:
                raise SoftcacheError(f"{flag} must be at least 1, got {value}")
        for flag, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--checkpoint-every", self.checkpoint_every), ("--chunk-tokens", self.chunk_tokens)):
            if value < 1:
                raise SoftcacheError(f"{flag} must be at least 1, got {value}")
        if self.fused_linear not in ("auto", "on", "off"):
            raise SoftcacheError(f"--fused-linear must be auto, on or off, got {self.fused_linear!r}")
        if not self.lr > 0:
            raise SoftcacheError(f"--lr must be greater than 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SoftcacheError(f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SoftcacheError(f"--warmup-steps must be at least 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise SoftcacheError("--weight-decay and --clip-grad must be at least 0")
        if not 0 <= self.alpha <= 1:
            raise SoftcacheError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.loss not in DIVERGENCES:
            raise SoftcacheError(f"--loss must be one of {', '.join(DIVERGENCES)}, got {self.loss!r}")
        if self.tail is not None and self.tail not in TAILS:
            raise SoftcacheError(f"--tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise SoftcacheError(f"--temperature must be greater than 0, got {self.temperature}")
        if not 0 < self.beta < 1:
            raise SoftcacheError(f"--beta must be between 0 and 1 (exclusive), got {self.beta}")
        if not 0 <= self.eval_fraction < 1:
            raise SoftcacheError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_store:
            raise SoftcacheError("give --eval-store or --eval-fraction, not both")
        if self.eval_every < 0 or self.num_workers < 0:
            raise SoftcacheError("--eval-every and --num-workers must be at least 0")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise SoftcacheError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may change when a run is resumed (a run directory may also be moved); every other field must
# match the saved run.
RESUMABLE_CHANGES = ("out", "resume", "progress", "num_workers", "verify_shards", "eval_every", "checkpoint_every", "device",
                     "chunk_tokens", "fused_linear")
