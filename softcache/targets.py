"""Target extraction: the teacher's logits to sparse targets, on the teacher's device.

Three kinds (see softcache.store.encoding): top-k and top-p log-probabilities, normalised over the
*full* vocabulary at the store's temperature so that the tail mass ``1 - sum(exp(values))`` of
every position is exact, and sampled ids with draw counts. This runs once per teacher position on
the teacher's device, so it is written for speed: no [positions, V] temporary outlives a chunk.

Targets are padded to a fixed width: a position with fewer entries repeats its slot-0 id in the
padding, with log-probability -inf (count 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from softcache.kinds import DRAWS


class Targets(NamedTuple):
    ids: torch.Tensor
    """[..., k] int64 vocabulary ids."""
    logprobs: torch.Tensor
    """[..., k] float32 log-probabilities (natural log); -inf in padding. Top-k and top-p rows are
    sorted descending; sampled rows are in ascending id order."""
    label_logprobs: torch.Tensor | None
    """[...] float32 log-probability at temperature 1 of each position's label (0 where the label is
    -100), or None when no labels were given."""
    lengths: torch.Tensor | None = None
    """[...] int64 real entries per position (None: all k)."""
    counts: torch.Tensor | None = None
    """[..., k] int64 draw counts (sampled targets only; 0 in padding)."""


BLOCK = 64
"""Ids per block of the block searches below: a row of V logits is seen as V / BLOCK blocks."""

SUB_BLOCK = 8
"""Values per sub-block of top-k's third level, inside the k blocks that the second level chose."""


def _top_of_blocks(rows: torch.Tensor, maxima: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows.topk(k, sorted=True)`` of [n, V] rows (any float dtype; values come back float32), as
    ``(values, indices)``, given their block maxima [n, V / BLOCK]: the second and third levels of the search.

    The k-th largest block maximum t is a lower bound of the k-th largest value (k blocks hold a value
    >= t), so every one of the k largest values lies in one of the k blocks with the largest maxima
    (ties with the k-th value aside, which are equal values). The same argument then picks k sub-blocks
    of SUB_BLOCK values among those k x BLOCK candidates, and the exact top-k is taken over k x SUB_BLOCK
    values instead of V. (The final ``topk`` over all k x BLOCK candidates was the largest cost after
    the pass over the row.)
    """
    n = rows.shape[0]
    best_blocks = maxima.topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = _take_blocks(rows, best_blocks, BLOCK).float()  # [n, k * BLOCK]
    best_subs = candidates.view(n, -1, SUB_BLOCK).amax(-1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    top = _take_blocks(candidates, best_subs, SUB_BLOCK).topk(k, dim=-1, sorted=True)
    within = best_subs.gather(1, top.indices // SUB_BLOCK) * SUB_BLOCK + top.indices % SUB_BLOCK  # in candidates
    return top.values, best_blocks.gather(1, within // BLOCK) * BLOCK + within % BLOCK


def _take_blocks(rows: torch.Tensor, blocks: torch.Tensor, width: int) -> torch.Tensor:
    """The blocks of ``width`` consecutive values numbered ``blocks`` [n, j] in each row of ``rows`` [n, m],
    concatenated per row: [n, j x width]. One ``index_select`` of whole blocks (a gather of single values
    with an expanded index cost about as much as the top-k after it)."""
    n, m = rows.shape
    per_row = m // width
    flat = blocks + torch.arange(0, n * per_row, per_row, device=rows.device)[:, None]
    return rows.reshape(n * per_row, width).index_select(0, flat.reshape(-1)).view(n, -1)


def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of :func:`extract_targets`: the top-k of ``log_softmax(logits / T)``."""
    targets = extract_targets(logits, k, temperature, chunk_rows=chunk_rows)
    return targets.ids, targets.logprobs


GROUP_ROWS = 512
"""Positions whose top-k is selected at once (the selection's working memory: GROUP_ROWS x k x BLOCK values)."""


@torch.inference_mode()
def extract_targets(
    logits: torch.Tensor, k: int, temperature: float = 1.0, labels: torch.Tensor | None = None,
    chunk_rows: int | None = None
) -> Targets:
    """Top-k log-probabilities of ``softmax(logits / temperature)``, sorted descending, and optionally
    the teacher's log-probability of the true next token (its cross-entropy, at temperature 1).

    Equal to ``log_softmax(logits / temperature).topk(k)`` but cheaper. The top-k is taken on the logits
    themselves (the order is the same). One pass over each row, a few rows at a time so that they stay in
    the core's cache, finds its block maxima and then its log-normaliser, which reuses the row maximum
    the block maxima give. (On a CPU, where the maxima allow it, that maximum is not even subtracted:
    exp(z / T) directly.) The top-k of a group of rows is then found from their block maxima
    (:func:`_top_of_blocks`), reading only the candidate blocks again. Nothing of size V is kept.
    ``logits`` is not modified. Runs under ``torch.inference_mode``: clone the outputs before using them
    in autograd (e.g. online KD).

    Args:
        logits: [..., V] teacher logits, any float dtype.
        k: entries to keep per position, 1 <= k <= V.
        temperature: divides the logits before normalising.
        labels: [...] int64 true next tokens (-100: none), or None.
        chunk_rows: positions per step of the pass over the rows (the float32 working memory is
            chunk_rows x V). Default: 8 on a CPU, where 8 rows of a large vocabulary still fit in a
            core's cache for the reads after the first (the passes over the rows are bound by memory
            there), else 64.
    """
    vocab = logits.shape[-1]
    assert 1 <= k <= vocab, f"k={k} outside 1..{vocab}"
    cpu = logits.device.type == "cpu"
    chunk_rows = chunk_rows or (8 if cpu else 64)
    flat = logits.reshape(-1, vocab)
    n = flat.shape[0]
    ids = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    values = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    label_values = None if labels is None else torch.zeros(n, dtype=torch.float32, device=logits.device)
    # Blocks where they save work (k well below V / BLOCK, V a multiple of BLOCK), else torch.topk itself.
    blocked = vocab % BLOCK == 0 and k * BLOCK * 4 <= vocab
    group_rows = max(GROUP_ROWS, chunk_rows)
    work = torch.empty(min(chunk_rows, n), vocab, dtype=torch.float32, device=logits.device)
    per_group = min(group_rows, n)
    maxima = torch.empty(per_group, vocab // BLOCK, dtype=torch.float32, device=logits.device) if blocked else None
    shift = torch.empty(per_group, 1, dtype=torch.float32, device=logits.device)  # subtracted before exp (or 0)
    log_normaliser = torch.empty_like(shift)  # log sum exp((z - shift) / T)
    lse_1 = torch.empty(per_group, dtype=torch.float32, device=logits.device) if labels is not None else None
    # On a CPU, where asking for a value costs no device sync, a chunk whose scaled maxima lie between
    # UNSHIFTED_FLOOR and this ceiling takes exp(z / T) unshifted (the sum of V of them stays finite in
    # float32): no subtraction over the rows.
    ceiling = 88.0 - math.log(vocab)
    for first in range(0, n, group_rows):
        group = flat[first : first + group_rows]
        for start in range(0, len(group), chunk_rows):
            rows = group[start : start + chunk_rows].float()
            stop = start + len(rows)
            if blocked:
                block_maxima = torch.amax(rows.view(len(rows), -1, BLOCK), -1, out=maxima[start:stop])
                peak = block_maxima.amax(-1, keepdim=True)
            else:
                top_values, top_ids = rows.topk(k, dim=-1, sorted=True)
                values[first + start : first + stop], ids[first + start : first + stop] = top_values, top_ids
                peak = top_values[:, :1]
            unshifted = False
            if cpu and UNSHIFTED_FLOOR < ceiling:
                lowest, highest = (peak / temperature).aminmax()
                unshifted = UNSHIFTED_FLOOR < lowest.item() and highest.item() < ceiling
            if unshifted:
                weights = _unshifted_weights(rows, temperature, work[: len(rows)])
                shift[start:stop] = 0.0
            else:
                weights = _shifted_weights(rows, peak, temperature, work)
                shift[start:stop] = peak
            torch.sum(weights, -1, keepdim=True, out=log_normaliser[start:stop]).log_()
            if labels is not None and temperature != 1.0:
                lse_1[start:stop] = torch.logsumexp(rows, dim=-1)
        size = len(group)
        if blocked:
            top_values, top_ids = _top_of_blocks(group, maxima[:size], k)
            ids[first : first + size] = top_ids
        else:
            top_values = values[first : first + size]
        values[first : first + size] = (top_values - shift[:size]) / temperature - log_normaliser[:size]
        if labels is not None:
            y = labels.reshape(-1)[first : first + size]
            lse = (shift[:size] + log_normaliser[:size]).squeeze(-1) if temperature == 1.0 else lse_1[:size]
            picked = group.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1).float() - lse
            label_values[first : first + size] = torch.where(y >= 0, picked, 0.0)
    shape = (*logits.shape[:-1], k)
    label_shape = logits.shape[:-1]
    return Targets(ids.reshape(shape), values.reshape(shape),
                   None if label_values is None else label_values.reshape(label_shape))


@torch.inference_mode()
def topp_targets(logits: torch.Tensor, k: int, p: float, temperature: float = 1.0,
                 labels: torch.Tensor | None = None, chunk_rows: int | None = None) -> Targets:
    """Top-p-k targets: per position, the smallest set of most probable ids whose probability
    reaches ``p``, at most ``k`` of them (at least 1). Padded to k as described in the module."""
    top = extract_targets(logits, k, temperature, labels, chunk_rows)
    before = torch.cumsum(top.logprobs.exp(), dim=-1) - top.logprobs.exp()  # mass of the better entries
    lengths = (before < p).sum(-1).clamp(1, k)
    padding = torch.arange(k, device=logits.device) >= lengths[..., None]
    ids = torch.where(padding, top.ids[..., :1], top.ids)
    logprobs = top.logprobs.masked_fill(padding, -math.inf)
    return Targets(ids, logprobs, top.label_logprobs, lengths)


@torch.inference_mode()
def sampled_targets(logits: torch.Tensor, samples: int, seeds: list[int], temperature: float = 1.0,
                    labels: torch.Tensor | None = None, chunk_rows: int = 64, draws: str = "systematic") -> Targets:
    """Sampled targets: ``samples`` draws per position from ``softmax(logits / temperature)``, kept as
    unique ids (ascending) with counts; ``logprobs`` is log(count / samples). Either way each id's
    expected count is ``samples`` times its probability, so count / samples is an unbiased estimate.

    On a CPU the weights of systematic draws are exp(z / T) with no maximum subtracted, where the row sums
    show that to be safe (:data:`UNSHIFTED_FLOOR`): the row is read once instead of three times, and the
    draws are those of the shifted weights but for float32 rounding.

    ``draws``:
      - ``systematic`` (stratified): one uniform u per position, and the draws are the ids at
        cumulative mass (j + u) / samples, j = 0..samples-1. An id of probability p is drawn
        floor(samples p) or ceil(samples p) times, so the probable ids are kept almost exactly and
        only the rest is random: about a third of the squared error of independent draws at
        samples = 50 on SmolLM2 (benchmarks/results/sampling.md), from one pass over the row and
        a search over its blocks.
      - ``independent``: ``samples`` independent draws with replacement (``torch.multinomial``); how
        stores were sampled before systematic draws, kept to resume and reproduce them.

    The randomness of sequence b comes from a generator seeded with ``seeds[b]`` and consumed in
    chunks of ``chunk_rows`` positions from the sequence's start, so a sequence gets the same draws
    whatever the batch it is in (on the same kind of device). Nothing waits on the host.

    Args:
        logits: [B, L, V] teacher logits.
        samples: draws per position (N).
        seeds: one seed per sequence.
    """
    assert draws in DRAWS, draws
    batch, length, vocab = logits.shape
    width = min(samples, vocab)
    ids = torch.empty(batch, length, width, dtype=torch.int64, device=logits.device)
    counts = torch.empty_like(ids)
    label_values = None if labels is None else torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    work = torch.empty(min(chunk_rows, length), vocab, dtype=torch.float32, device=logits.device)
    unshifted = draws == "systematic" and logits.device.type == "cpu"
    for b in range(batch):
        generator = torch.Generator(device=logits.device).manual_seed(seeds[b])
        for start in range(0, length, chunk_rows):
            rows = logits[b, start : start + chunk_rows].float()
            peak = None  # None: the weights are unshifted
            if draws == "systematic":
                u = torch.rand(len(rows), 1, dtype=torch.float64, generator=generator, device=rows.device)
                if unshifted:  # one pass fewer where it is safe (see _unshifted_weights)
                    weights = _unshifted_weights(rows, temperature, work[: len(rows)])
                    chunk_draws, total = _systematic_draws(weights, samples, u)
                if not unshifted or not _unshifted_is_safe(total, vocab):  # the same u: the same draws
                    peak = rows.amax(dim=-1, keepdim=True)
                    chunk_draws, total = _systematic_draws(_shifted_weights(rows, peak, temperature, work), samples, u)
            else:
                peak = rows.amax(dim=-1, keepdim=True)
                weights = _shifted_weights(rows, peak, temperature, work)
                chunk_draws = torch.multinomial(weights, samples, replacement=True, generator=generator).sort(-1).values
                total = weights.sum(-1) if label_values is not None else None  # float32, as these stores were written
            if label_values is not None:
                y = labels[b, start : start + chunk_rows]
                log_total = total.log().float()
                lse_1 = ((log_total if peak is None else peak.squeeze(-1) + log_total) if temperature == 1.0
                         else torch.logsumexp(rows, dim=-1))
                picked = rows.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1) - lse_1
                label_values[b, start : start + chunk_rows] = torch.where(y >= 0, picked, 0.0)
            chunk_ids, chunk_counts = _unique_rows(chunk_draws, width)
            ids[b, start : start + chunk_rows] = chunk_ids
            counts[b, start : start + chunk_rows] = chunk_counts
    lengths = (counts > 0).sum(-1)
    logprobs = torch.log(counts.float() / samples)  # -inf in padding
    return Targets(ids, logprobs, label_values, lengths, counts)


UNSHIFTED_FLOOR = -20.0
"""The largest scaled logit z / T of a row must be above this for its weights to be exp(z / T), with no
max subtracted: the ids whose weights then underflow (z / T < -87) are below e^-67 of it, draws that
never happen. Above, a weight or a block's sum that overflows float32 (z / T > 84) shows as an infinite
row sum, and the row takes the shifted weights instead."""


def _shifted_weights(rows: torch.Tensor, peak: torch.Tensor, temperature: float, work: torch.Tensor) -> torch.Tensor:
    """exp((rows - peak) / T) into ``work``: unnormalised weights that cannot overflow."""
    weights = torch.sub(rows, peak, out=work[: len(rows)])  # <= 0
    if temperature != 1.0:
        weights.div_(temperature)
    return weights.exp_()


def _unshifted_weights(rows: torch.Tensor, temperature: float, work: torch.Tensor) -> torch.Tensor:
    """exp(rows / T) into ``work``: the row read once instead of three times (its max, the shift, the exp).
    Only valid where :func:`_unshifted_is_safe` holds of the weights' sums."""
    if temperature == 1.0:
        return torch.exp(rows, out=work)
    return torch.div(rows, temperature, out=work).exp_()


def _unshifted_is_safe(total: torch.Tensor, vocab: int) -> bool:
    """Whether unshifted weights with these row sums (float64) are valid: a finite sum means nothing
    overflowed, and a sum above V e^UNSHIFTED_FLOOR that some weight is above e^UNSHIFTED_FLOOR. A host
    check, so CPU only."""
    return bool(torch.isfinite(total).all()) and bool((total > vocab * math.exp(UNSHIFTED_FLOOR)).all())


def _systematic_draws(weights: torch.Tensor, samples: int, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Systematic draws from rows of non-negative ``weights`` [n, V], given ``u`` [n, 1] float64 uniform in
    [0, 1): ``(ids [n, samples] ascending, row sums [n] float64)``.

    Draw j of a row is the id whose interval of the cumulative weights holds (j + u) / samples of the
    row's sum. The search runs in two levels, over block sums (in
    float64, so that no id's interval is lost to rounding against the row's sum) and then inside the
    few blocks the draws land in, so no cumulative sum of V values is formed. Where the draws would
    gather more values than the row holds (samples x BLOCK > V) or V is not a multiple of BLOCK, one
    cumulative sum over the row is cheaper and is used instead.
    """
    n, vocab = weights.shape
    steps = torch.arange(samples, dtype=torch.float64, device=weights.device)
    if vocab % BLOCK or samples * BLOCK > vocab:
        cumulative = weights.double().cumsum(-1)
        total = cumulative[:, -1]
        points = (steps + u) * (total[:, None] / samples)
        return torch.searchsorted(cumulative, points, right=True).clamp_(max=vocab - 1), total
    grouped = weights.view(n, vocab // BLOCK, BLOCK)
    block_mass = grouped.sum(-1).double()  # 64 float32 terms: exact enough, and no float64 copy of the row
    block_end = block_mass.cumsum(-1)
    total = block_end[:, -1]
    points = (steps + u) * (total[:, None] / samples)  # < total: each lands in a block of positive mass
    block = torch.searchsorted(block_end, points, right=True).clamp_(max=block_end.shape[1] - 1)
    inside = (points - (block_end.gather(1, block) - block_mass.gather(1, block))).float().clamp_(min=0)
    within = _take_blocks(weights, block, BLOCK).view(n, samples, BLOCK).cumsum(-1)
    last = within[..., -1:]
    inside = torch.minimum(inside[..., None], torch.nextafter(last, torch.zeros_like(last)))
    offset = torch.searchsorted(within, inside, right=True).squeeze(-1).clamp_(max=BLOCK - 1)
    return block * BLOCK + offset, total


def _unique_rows(sorted_draws: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of each sorted row and their counts, left-aligned in ``width`` slots; padding
    repeats the row's first id with count 0."""
    n, samples = sorted_draws.shape
    starts = torch.ones_like(sorted_draws, dtype=torch.bool)
    starts[:, 1:] = sorted_draws[:, 1:] != sorted_draws[:, :-1]
    slot = starts.cumsum(-1) - 1
    counts = torch.zeros(n, samples, dtype=torch.int64, device=sorted_draws.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    ids = sorted_draws[:, :1].repeat(1, samples)
    ids.scatter_(1, slot, sorted_draws)  # every write to a slot carries the same id
    return ids[:, :width], counts[:, :width]


def sequence_seed(seed: int, sequence: int) -> int:
    """The sampling seed of global sequence ``sequence`` in a store written with ``--seed seed``."""
    import numpy as np

    return int(np.random.SeedSequence([seed, sequence]).generate_state(1, np.uint64)[0] >> 1)
