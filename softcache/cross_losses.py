"""Distillation across tokenizers: cached teacher targets carried over to a student's vocabulary.

Pure tensor functions, as softcache.losses. Two ways, chosen by what the vocabularies share:

- :func:`project_targets` (exact projection): each cached teacher id becomes the student id of the
  same bytes (softcache.vocab_map); ids with none become padding, so their mass joins the
  teacher's tail and :func:`softcache.losses.sparse_kd` with ``tail="bucket"`` stays exact for what
  is matched: the student is taught the matched ids' probabilities and the total of the rest. Two
  teacher ids of one student id are summed. With the same vocabulary on both sides the targets
  come back unchanged, and so does every loss.
- :func:`uld` (universal logit distillation, Boizard et al. 2024): no id needs a match. The L1
  distance between the teacher's and the student's probabilities, each sorted in decreasing
  order; over the k cached probabilities and the student's k largest, plus the difference of the
  mass beyond them (the distance over the sorted remainders is at least that much, and equal to it
  when the two remainders are equally spread, as with k = V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from softcache.losses import checkpointed_chunks, distillation_loss


def project_targets(target_ids: torch.Tensor, target_logprobs: torch.Tensor, student_of: torch.Tensor,
                    student_vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached teacher targets as targets over the student's vocabulary.

    Args:
        target_ids: [n, k] int64 teacher ids (padding repeats slot 0's id); k below ``student_vocab``, so
            that a row the projection pads has a tail (softcache.losses counts a row of k >= V slots as
            holding every id).
        target_logprobs: [n, k] float teacher log-probabilities over the teacher's full vocabulary (-inf: padding).
        student_of: [teacher vocabulary] int64 student id of each teacher id, -1 where none.
        student_vocab: the student's vocabulary size.

    Returns:
        ids [n, k] int64 student ids in the teacher's slots, distinct within a row; a slot whose id has no
        student id, or whose student id an earlier slot holds, is padding and repeats a held id;
        logprobs [n, k] of the same dtype: the teacher's mass on each student id (two teacher ids of one
        student id summed into the first's slot), -inf for padding; normalised over the teacher's full
        vocabulary, so what no student id holds is the tail's;
        matched [n] bool: some cached id of the row has a student id (a row without is all tail).
    """
    if target_ids.shape[-1] >= student_vocab:
        raise ValueError(f"{target_ids.shape[-1]} cached ids per position for a student vocabulary of {student_vocab}: "
                         "a projected row needs room for its tail")
    mapped = student_of[target_ids]
    ok = (mapped >= 0) & (target_logprobs > -math.inf)
    key = torch.where(ok, mapped, student_vocab)  # unmatched and padding sort last
    key, order = key.sort(dim=-1, stable=True)
    held = key < student_vocab
    logprobs = torch.where(held, target_logprobs.gather(-1, order), -math.inf)
    first = torch.ones_like(held)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    slot = first.cumsum(-1) - 1  # the distinct student id each sorted entry adds to
    peak = torch.full_like(logprobs, -math.inf).scatter_reduce(-1, slot, logprobs, "amax")
    safe = torch.where(peak > -math.inf, peak, 0.0)
    total = torch.zeros_like(logprobs).scatter_add(-1, slot, (logprobs - safe.gather(-1, slot)).exp())
    merged = torch.where(peak > -math.inf, safe + total.log(), -math.inf).gather(-1, slot)
    lone = first & held
    unique = lone.clone()
    unique[:, :-1] &= first[:, 1:]  # no later entry adds to it: it keeps the teacher's own value, bit for bit
    values = torch.where(unique, logprobs, torch.where(lone, merged, -math.inf))
    ids = torch.empty_like(key).scatter(-1, order, torch.where(lone, key, 0))
    kept = torch.empty_like(lone).scatter(-1, order, lone)  # back in the teacher's slots
    matched = kept.any(-1)
    padding = ids.gather(-1, kept.to(torch.uint8).argmax(-1, keepdim=True))  # the first kept slot's id
    return torch.where(kept, ids, padding), torch.empty_like(values).scatter(-1, order, values), matched


def uld(logits: torch.Tensor, target_logprobs: torch.Tensor, temperature: float = 1.0,
        exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position universal logit distillation loss: the L1 distance between the sorted teacher and
    student distributions, over the k cached teacher probabilities against the student's k largest,
    plus the difference of the mass beyond them (see the module docstring); times T^2, as every KD loss.

    Args:
        logits: [n, V] student logits over its own vocabulary, any float dtype (computed in float32).
        target_logprobs: [n, k] teacher log-probabilities of its cached ids, normalised over its full
            vocabulary, in any order (-inf: padding).
        temperature: student logits are divided by it.
        exclude: [n, k'] student ids whose mass another term accounts for (the hybrid loss's matched
            ids; -1 or repeats allowed). With it, the teacher's m finite entries are compared with the
            student's m largest probabilities among the other ids, and nothing beyond them: how much
            mass lies outside the excluded ids is the other term's.

    Returns:
        [n] float32 losses (float64 for float64 logits), in probability units, between 0 and 2 T^2.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    k = min(target_logprobs.shape[-1], z.shape[-1])
    teacher = target_logprobs.to(z.dtype).exp().sort(dim=-1, descending=True).values[:, :k]
    student_logprobs = torch.log_softmax(z / temperature, dim=-1)
    if exclude is not None:
        hit = torch.zeros_like(student_logprobs).scatter_reduce(-1, exclude.clamp_min(0), (exclude >= 0).to(z.dtype),
                                                                "amax")
        student_logprobs = student_logprobs.masked_fill(hit > 0, -math.inf)
    student = student_logprobs.topk(k, dim=-1).values.exp()
    if exclude is not None:
        counted = torch.arange(k, device=z.device) < (target_logprobs > -math.inf).sum(-1, keepdim=True)
        return torch.where(counted, (teacher - student).abs(), 0.0).sum(-1) * temperature**2
    rest = ((1 - teacher.sum(-1)).clamp_min(0) - (1 - student.sum(-1)).clamp_min(0)).abs()
    return ((teacher - student).abs().sum(-1) + rest) * temperature**2


@dataclass(frozen=True)
class CrossTokenizerLoss:
    """The KD and CE loss of a student with another tokenizer than the teacher's, as
    :class:`softcache.losses.DistillationLoss` is for one with the same: ``loss(output, batch)`` returns
    ``(kd_sum, ce_sum)`` over a batch of softcache.cross_data (``output``: logits, or a model output).

    ``mode``:

    - ``projection``: forward KL to the projected targets with the tail bucket (exact for what maps),
      at the positions where something maps;
    - ``uld``: the sorted distance to all cached teacher probabilities, at every aligned position;
    - ``hybrid``: both at once, as TRL's GOLD combines them: the projection's KL carries the mass of
      the ids that map, and the total of the rest, exactly; the sorted distance shapes how the
      student spreads that rest, comparing the teacher's unmatched probabilities with the student's
      largest ones outside the matched ids. The two add with weight 1 (KL in nats, the distance in
      probability units, both scaled by T^2).
    """

    mode: str = "projection"
    temperature: float = 1.0
    chunk_tokens: int = 256

    def __call__(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = getattr(output, "logits", output)
        mask = batch["mask"]
        projected = mask if self.mode != "uld" else torch.zeros_like(mask)
        kd, ce = distillation_loss(logits, batch["target_ids"], batch["target_logprobs"], projected, batch["labels"],
                                   "fkl", "bucket", self.temperature, chunk_tokens=self.chunk_tokens)
        if self.mode == "projection":
            return kd, ce
        k = batch["target_ids"].shape[-1]
        held = batch["target_ids"].reshape(-1, k)
        if self.mode == "hybrid":  # the student ids the projection holds (its padding repeats a held one)
            held = torch.where(batch["target_logprobs"].reshape(-1, k) > -math.inf, held, -1)
        flat = (logits.reshape(-1, logits.shape[-1]), batch["teacher_logprobs"].reshape(-1, k), held, mask.reshape(-1))

        def chunk_sums(z, teacher, exclude, valid):
            distance = uld(z, teacher, self.temperature, exclude if self.mode == "hybrid" else None)
            return torch.where(valid, distance, 0.0).sum(), distance.new_zeros(())

        # In chunks of positions, recomputed in backward: the working memory stays chunk_tokens x V.
        sorted_kd, _ = checkpointed_chunks(chunk_sums, flat, self.chunk_tokens, logits.requires_grad,
                                           dtype=logits.dtype, device=logits.device)
        return kd + sorted_kd.float(), ce
