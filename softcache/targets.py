"""Target extraction: the teacher's logits to cached top-k log-probabilities, on the teacher's device.

Values are log-probabilities normalised over the *full* vocabulary at the store's temperature,
so the tail mass ``1 - sum(exp(values))`` of every position is exact. The work is done in chunks
of rows so that no more than ``chunk_rows x V`` float32 values exist besides the model's logits.
"""

from __future__ import annotations

import torch

FLOAT16_MIN = float(torch.finfo(torch.float16).min)


@torch.inference_mode()
def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_rows: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities of ``softmax(logits / temperature)``, sorted descending.

    Args:
        logits: [..., V] teacher logits, any float dtype.
        k: entries to keep per position, 1 <= k <= V.
        temperature: divides the logits before normalising.
        chunk_rows: positions handled at once (bounds the float32 working memory).

    Returns:
        ids: [..., k] int64 vocabulary ids.
        logprobs: [..., k] float32 log-probabilities (natural log), each row sorted descending.
    """
    vocab = logits.shape[-1]
    assert 1 <= k <= vocab, f"k={k} outside 1..{vocab}"
    flat = logits.reshape(-1, vocab)
    ids = torch.empty(flat.shape[0], k, dtype=torch.int64, device=logits.device)
    values = torch.empty(flat.shape[0], k, dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_rows):
        rows = flat[start : start + chunk_rows].float()
        if temperature != 1.0:
            rows = rows / temperature
        top = torch.log_softmax(rows, dim=-1).topk(k, dim=-1, sorted=True)
        values[start : start + chunk_rows] = top.values
        ids[start : start + chunk_rows] = top.indices
    shape = (*logits.shape[:-1], k)
    return ids.reshape(shape), values.reshape(shape)


def to_storage(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Narrow targets on their device before the copy to the host: int32 ids, float16 values.

    float16 has a better mantissa than bfloat16 for log-probabilities in [-30, 0]; values below
    float16's range are clamped to its minimum (-65504) so that ``exp`` gives 0, never NaN.
    """
    return ids.to(torch.int32), logprobs.clamp_min(FLOAT16_MIN).to(torch.float16)
