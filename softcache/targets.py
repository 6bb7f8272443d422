"""Target extraction: the teacher's logits to cached top-k log-probabilities, on the teacher's device.

Values are log-probabilities normalised over the *full* vocabulary at the store's temperature,
so the tail mass ``1 - sum(exp(values))`` of every position is exact. This runs once per teacher
position on the teacher's device, so it is written for speed: no [positions, V] temporary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT16_MIN = float(torch.finfo(torch.float16).min)


class Targets(NamedTuple):
    ids: torch.Tensor
    """[..., k] int64 vocabulary ids."""
    logprobs: torch.Tensor
    """[..., k] float32 log-probabilities (natural log), each row sorted descending."""
    label_logprobs: torch.Tensor | None
    """[...] float32 log-probability at temperature 1 of each position's label (0 where the label is
    -100), or None when no labels were given."""


def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_rows: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of :func:`extract_targets`: the top-k of ``log_softmax(logits / T)``."""
    targets = extract_targets(logits, k, temperature, chunk_rows=chunk_rows)
    return targets.ids, targets.logprobs


@torch.inference_mode()
def extract_targets(
    logits: torch.Tensor, k: int, temperature: float = 1.0, labels: torch.Tensor | None = None, chunk_rows: int = 64
) -> Targets:
    """Top-k log-probabilities of ``softmax(logits / temperature)``, sorted descending, and optionally
    the teacher's log-probability of the true next token (its cross-entropy, at temperature 1).

    Equal to ``log_softmax(logits / temperature).topk(k)`` but cheaper: the top-k is taken on the
    logits themselves (the order is the same) and the log-normaliser reuses the row maximum that
    top-k already found, so each chunk is read twice and nothing of size V is kept. Chunks are
    small so that the second read comes from cache. ``logits`` is not modified. Runs under
    ``torch.inference_mode``: clone the outputs before using them in autograd (e.g. online KD).

    Args:
        logits: [..., V] teacher logits, any float dtype.
        k: entries to keep per position, 1 <= k <= V.
        temperature: divides the logits before normalising.
        labels: [...] int64 true next tokens (-100: none), or None.
        chunk_rows: positions handled at once (bounds the float32 working memory to chunk_rows x V).
    """
    vocab = logits.shape[-1]
    assert 1 <= k <= vocab, f"k={k} outside 1..{vocab}"
    flat = logits.reshape(-1, vocab)
    n = flat.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    values = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    flat_labels = None if labels is None else labels.reshape(-1)
    label_values = None if labels is None else torch.zeros(n, dtype=torch.float32, device=logits.device)
    work = torch.empty(min(chunk_rows, n), vocab, dtype=torch.float32, device=logits.device)
    for start in range(0, n, chunk_rows):
        rows = flat[start : start + chunk_rows].float()
        top = rows.topk(k, dim=-1, sorted=True)
        peak = top.values[:, :1]
        shifted = torch.sub(rows, peak, out=work[: len(rows)])  # <= 0, so exp cannot overflow
        if temperature != 1.0:
            shifted.div_(temperature)
        log_normaliser = shifted.exp_().sum(-1, keepdim=True).log_()
        values[start : start + chunk_rows] = (top.values - peak) / temperature - log_normaliser
        ids[start : start + chunk_rows] = top.indices
        if flat_labels is not None:
            y = flat_labels[start : start + chunk_rows]
            lse_1 = peak + log_normaliser if temperature == 1.0 else torch.logsumexp(rows, dim=-1, keepdim=True)
            picked = rows.gather(-1, y.clamp_min(0)[:, None]) - lse_1
            label_values[start : start + chunk_rows] = torch.where(y >= 0, picked.squeeze(-1), 0.0)
    shape = (*logits.shape[:-1], k)
    label_shape = logits.shape[:-1]
    return Targets(ids.reshape(shape), values.reshape(shape),
                   None if label_values is None else label_values.reshape(label_shape))


def to_storage(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Narrow targets on their device before the copy to the host: int32 ids, float16 values.

    float16 has a better mantissa than bfloat16 for log-probabilities in [-30, 0]; values below
    float16's range are clamped to its minimum (-65504) so that ``exp`` gives 0, never NaN.
    """
    return ids.to(torch.int32), logprobs.clamp_min(FLOAT16_MIN).to(torch.float16)
