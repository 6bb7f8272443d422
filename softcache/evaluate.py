"""Evaluating a student against a store: cross-entropy and perplexity on the true tokens, forward KL
to the cached teacher targets (at the store's temperature; tail bucket for top-k/top-p stores; for
a sampled store, KL to the sampled estimate count / N, which is noisier than KL to the teacher),
top-1 agreement with the teacher's most probable stored id, expected calibration error of the student's top-1 prediction of the true token (15
equal-width confidence bins), and bits per byte of text (the cross-entropy over the bytes of the
tokens predicted: the unit that compares students of different tokenizers). Every metric but bits
per byte is a sum over valid positions divided by their count.

Through a view (softcache.view: a student with another tokenizer), the student reads the view's
tokens; KL and agreement are against the teacher's targets carried over to the student's vocabulary
(softcache.cross_losses.project_targets) at the aligned positions where something maps."""

from __future__ import annotations

import functools
import math

ECE_BINS = 15

import torch
from torch.utils.data import DataLoader

from softcache.data import StoreDataset
from softcache.vocab_map import token_bytes
from softcache.losses import distillation_loss
from softcache.packing import forward_documents, uses_varlen


@torch.no_grad()
def evaluate(model, store: str, start: int = 0, stop: int | None = None, batch_size: int = 8,
             device: torch.device | str = "cpu", temperature: float = 1.0, chunk_tokens: int = 256,
             autocast_dtype: torch.dtype | None = None, tail: str | None = None, view: str | None = None) -> dict:
    """Metrics of ``model`` on sequences [start, stop) of ``store`` (in stored order).

    Returns a dict: ``ce`` (nats per token), ``perplexity``, ``kl`` (nats per position), ``top1_agreement``
    (fraction of positions where the student's most likely token is the teacher's), ``ece`` (expected
    calibration error: sum over bins of |accuracy - confidence| weighted by the bin's share),
    ``bits_per_byte``, ``tokens``. ``tail``: how KL treats the mass outside the stored ids (default: the
    default of the store's target kind, softcache.kinds; through a ``view``, always the tail bucket).
    """
    from softcache.store import open_store

    opened = open_store(store)
    tail = "bucket" if view else tail or opened.targets.spec.default_tail
    was_training = model.training
    model.eval()
    device = torch.device(device)
    options = dict(start=start, stop=stop, epochs=1, shuffle=False, world_size=1, rank=0)
    if view:
        from softcache.cross_data import ViewDataset
        from softcache.view import View

        dataset = ViewDataset(store, view, batch_size, "projection", verify_view=False, **options)
        tokenizer_path = View(view, verify=False).tokenizer_path
    else:
        dataset = StoreDataset(store, batch_size, **options)
        tokenizer_path = opened.tokenizer_path
    byte_lengths = torch.tensor(_byte_lengths(str(tokenizer_path)), device=device)
    sums = torch.zeros(6, dtype=torch.float64)  # ce, ce count, kl, kd count, agreements, bytes predicted
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64)  # positions, confidence sum, correct sum
    for batch in DataLoader(dataset, batch_size=None, num_workers=0):
        batch = {name: value.to(device) for name, value in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if "segments" in batch:
                logits = forward_documents(model, batch["input_ids"], batch["segments"], uses_varlen(model)).logits
            else:
                logits = model(input_ids=batch["input_ids"]).logits
        kl, ce = distillation_loss(logits, batch["target_ids"], batch["target_logprobs"], batch["mask"],
                                   batch["labels"], "fkl", tail, temperature, chunk_tokens=chunk_tokens)
        top = logits.float().softmax(-1).max(-1)
        teacher_top = batch["target_ids"].gather(-1, batch["target_logprobs"].argmax(-1, keepdim=True)).squeeze(-1)
        agree = ((top.indices == teacher_top) & batch["mask"]).sum()
        labelled = batch["labels"] >= 0
        predicted = byte_lengths[batch["labels"][labelled].clamp_max(len(byte_lengths) - 1)].sum()
        sums += torch.stack([ce, labelled.sum(), kl, batch["mask"].sum(), agree, predicted]).double().cpu()
        bins += calibration_bins(top.values[labelled], top.indices[labelled] == batch["labels"][labelled])
    model.train(was_training)
    ce, ce_count, kl, kd_count, agree, predicted = sums.tolist()
    ce_mean = ce / max(ce_count, 1)
    ece = float((bins[1] - bins[2]).abs().sum() / bins[0].sum().clamp_min(1))  # sum_b n_b/N |conf_b - acc_b|
    return {"ce": ce_mean, "perplexity": math.exp(min(ce_mean, 700)), "kl": kl / max(kd_count, 1),
            "top1_agreement": agree / max(kd_count, 1), "ece": ece,
            "bits_per_byte": ce / math.log(2) / predicted if predicted else math.nan, "tokens": int(ce_count)}


@functools.lru_cache(maxsize=4)
def _byte_lengths(tokenizer_path: str) -> tuple[int, ...]:
    """Bytes of text of each token id of the tokenizer at ``tokenizer_path``, then a 0 for ids beyond it. Read
    once per process: a run evaluates every --eval-every steps with the same tokenizer."""
    from transformers import AutoTokenizer

    pieces = token_bytes(AutoTokenizer.from_pretrained(tokenizer_path))
    return tuple(0 if p is None else len(p) for p in pieces) + (0,)


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[3, ECE_BINS] float64: per equal-width confidence bin, the count, the summed confidence and
    the number correct. ``confidence`` [n] in [0, 1]; ``correct`` [n] bool."""
    confidence = confidence.double().cpu()
    which = (confidence * ECE_BINS).long().clamp(0, ECE_BINS - 1)
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64)
    for row, values in enumerate((torch.ones_like(confidence), confidence, correct.double().cpu())):
        bins[row].index_add_(0, which, values)
    return bins
