"""Facts both jobs need about a Hugging Face model and where it runs: device, dtype, output size.

The teacher job and the student job resolve ``--device``/``--dtype`` the same way and ask a model
the same questions (how many logits per position, how many positions), so these live here rather
than in either job's module.
"""

from __future__ import annotations

import torch

from softcache.errors import SoftcacheError


def resolve_device(device: str) -> torch.device:
    """``--device`` as a torch device: auto is cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SoftcacheError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype: auto is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def output_vocab(model) -> int:
    """Number of logits the model returns per position (may exceed its tokenizer's length)."""
    return int(model.get_output_embeddings().weight.shape[0])


def max_positions(model) -> int | None:
    """The longest sequence the model's config admits, when it says."""
    return getattr(model.config, "max_position_embeddings", None)
