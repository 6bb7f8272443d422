"""Evaluating a student against a store: cross-entropy and perplexity on the true tokens, forward KL
to the cached teacher targets (tail bucket, at the store's temperature), and top-1 agreement with
the teacher. Every metric is a sum over valid positions divided by their count."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from softcache.data import StoreDataset
from softcache.losses import distillation_loss


@torch.no_grad()
def evaluate(model, store: str, start: int = 0, stop: int | None = None, batch_size: int = 8,
             device: torch.device | str = "cpu", temperature: float = 1.0, chunk_tokens: int = 256,
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Metrics of ``model`` on sequences [start, stop) of ``store`` (in stored order).

    Returns a dict: ``ce`` (nats per token), ``perplexity``, ``kl`` (nats per position), ``top1_agreement``
    (fraction of positions where the student's most likely token is the teacher's), ``tokens``.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    dataset = StoreDataset(store, batch_size, start=start, stop=stop, epochs=1, shuffle=False, world_size=1, rank=0)
    sums = torch.zeros(5, dtype=torch.float64)  # ce, ce count, kl, kd count, agreements
    for batch in DataLoader(dataset, batch_size=None, num_workers=0):
        batch = {name: value.to(device) for name, value in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"]).logits
        kl, ce = distillation_loss(logits, batch["target_ids"], batch["target_logprobs"], batch["mask"],
                                   batch["labels"], "fkl", "bucket", temperature, chunk_tokens=chunk_tokens)
        agree = ((logits.argmax(-1) == batch["target_ids"][..., 0]) & batch["mask"]).sum()
        sums += torch.stack([ce, (batch["labels"] >= 0).sum(), kl, batch["mask"].sum(), agree]).double().cpu()
    model.train(was_training)
    ce, ce_count, kl, kd_count, agree = sums.tolist()
    ce_mean = ce / max(ce_count, 1)
    return {"ce": ce_mean, "perplexity": math.exp(min(ce_mean, 700)), "kl": kl / max(kd_count, 1),
            "top1_agreement": agree / max(kd_count, 1), "tokens": int(ce_count)}
