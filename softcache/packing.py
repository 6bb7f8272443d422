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
bytes. A model whose attention is flash-attention's (``attn_implementation="flash_attention_2"``)
gets the same effect without a mask from its variable-length kernels: the rows are laid end to end
as one row of B x L tokens and the restarting position ids mark the documents
(:func:`forward_documents`; written for CUDA, not yet run on one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that find documents from position ids alone (one packed row of B x L)."""


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


def uses_varlen(model) -> bool:
    """Whether ``model`` (a Hugging Face model) attends with a variable-length kernel (see the module)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in VARLEN_ATTENTION


def forward_documents(forward: Callable, input_ids: torch.Tensor, segments: torch.Tensor, varlen: bool = False):
    """``forward(input_ids=..., ...)`` on packed rows [B, L] so that each document is seen alone.

    With ``varlen`` the rows go in as one row of B x L tokens with only position ids (which restart at
    every row's first token too, as each row starts a document), and the output's ``logits`` (or the
    output itself, a tensor) is shaped back to [B, L, ...]; else with the block-diagonal mask."""
    positions = document_positions(segments)
    if not varlen:
        return forward(input_ids=input_ids, attention_mask=document_mask(segments), position_ids=positions)
    batch, length = input_ids.shape
    output = forward(input_ids=input_ids.reshape(1, -1), position_ids=positions.reshape(1, -1))
    if isinstance(output, torch.Tensor):
        return output.reshape(batch, length, *output.shape[2:])
    output.logits = output.logits.reshape(batch, length, *output.logits.shape[2:])
    return output
