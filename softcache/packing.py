"""Packing several documents into one sequence without letting them see each other.

A packed row holds documents one after another; ``segments`` [B, L] (int) numbers them, the same
number for every token of one document, and a new number at each document's first token. For the
model to treat each document as if it were alone, two things must hold in every forward pass (the
teacher's, so a cached target is what the teacher predicts for that document alone, and the
student's, so it learns in the same conditions):

- position ids restart at 0 at each document's first token (:func:`document_positions`);
- no token attends to a token of another document: a block-diagonal causal mask
  (:func:`document_mask`), [B, 1, L, L] bool, True where attention is allowed.

Hugging Face causal LMs take both (``model(input_ids, attention_mask=mask, position_ids=positions)``);
with eager or SDPA attention the 4-D mask is used as given, so a packed row's logits equal each
document's logits computed alone, to float rounding (tests/test_packing.py). The mask costs B x L^2
bytes; on CUDA, flash-attention's variable-length kernels get the same effect from the position ids
alone, without a mask (not yet used here).
"""

from __future__ import annotations

import torch


def document_starts(segments: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True at each document's first token (position 0, and wherever the segment changes)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, L] int64 position ids that restart at 0 at every document's first token."""
    length = segments.shape[-1]
    index = torch.arange(length, device=segments.device).expand_as(segments)
    first = torch.where(document_starts(segments), index, torch.zeros_like(index))
    return index - torch.cummax(first, dim=-1).values


def document_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool: query i may attend to key j when j <= i and both are in one document."""
    length = segments.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def crosses_documents(segments: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True at positions whose next token starts another document. The target there is the
    first token of an unrelated document, which nothing before it predicts: such positions teach
    nothing and are masked out of the losses. The last position (no next token) is True too."""
    starts = document_starts(segments)
    crossing = torch.ones_like(starts)
    crossing[:, :-1] = starts[:, 1:]
    return crossing
