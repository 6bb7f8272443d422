"""Sparse distillation losses on cached teacher targets: pure tensor functions.

Notation, per position: teacher t over a vocabulary of V ids, of which the store keeps k ids K
with log-probabilities normalised over the full vocabulary; student logits z at temperature T,
q = softmax(z / T). What happens to the mass outside K is a named choice, ``tail``:

- ``"bucket"`` (default): one extra class holds the leftover mass on both sides, t_tail = 1 - sum_K t
  (exact, because the cached values are normalised) and q_tail = 1 - sum_K q. Forward KL is then a
  proper KL between two coarsened distributions; with k = V it equals dense KL exactly.
- ``"renorm"``: both sides are renormalised over K. Biased (the student grows over-confident on
  the head), offered because other tools do it.
- ``"none"``: no tail class: the loss is sum_K t (log t - log q). Exact for targets that sum to 1,
  i.e. sampled targets (count / N), whose estimate of the teacher is unbiased.

Rows may be padded (softcache.store.encoding): a padding entry has log-probability -inf and
repeats the id of slot 0. Padding adds nothing to any loss or gradient.

Forward KL is the reference loss. Reverse KL, JSD(beta) and TVD need the teacher's distribution
outside K, which the store does not have: with the tail bucket they are computed on the coarsened
(k + 1)-class distributions, which is finite and close but *not* the dense value.

Every KD loss is multiplied by T^2 (Hinton et al.) so gradient scale does not change with T.

Losses return per-position values or sums, never means: the trainer divides by the number of
valid positions of the whole optimiser step (all micro-batches, all ranks). The student's
log-normaliser is computed in float32 in chunks of positions, each chunk recomputed during
backward (activation checkpointing), so no float32 copy of the [positions, V] logits outlives
its chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
TAILS = ("bucket", "renorm", "none")
_EMPTY = -1e30  # stands in for -inf at cached ids: finite, so no NaN appears in any gradient


def _student_head_and_rest(logits: torch.Tensor, target_ids: torch.Tensor, temperature: float):
    """Student logits at T on K [n, k], and the log-sum-exp of those outside K [n] (autograd path).

    The outside sum is taken directly over the other ids, so the student's tail mass has full
    relative precision instead of coming from 1 - sum_K q.
    """
    z = _at_least_float32(logits)
    if temperature != 1.0:
        z = z / temperature
    return z.gather(-1, target_ids), torch.logsumexp(z.scatter(-1, target_ids, _EMPTY), dim=-1)


def _teacher_mass(target_logprobs: torch.Tensor, vocab: int):
    """log of the teacher's cached mass [n] (at most 0) and whether a tail class exists [n] bool:
    when K misses some ids and the teacher left mass there."""
    t_mass = torch.logsumexp(target_logprobs, dim=-1).clamp_max(0.0)
    return t_mass, (target_logprobs.shape[-1] < vocab) & (t_mass < 0)


class Coarse(NamedTuple):
    """Teacher and student log-probabilities over the cached ids K and one tail class, per position."""

    t_head: torch.Tensor
    """[n, k] teacher log-probabilities on K (-inf: padding)."""
    q_head: torch.Tensor
    """[n, k] student log-probabilities on K at temperature T."""
    t_tail: torch.Tensor
    """[n] log of the teacher's mass outside K."""
    q_tail: torch.Tensor
    """[n] log of the student's mass outside K."""
    has_tail: torch.Tensor
    """[n] bool: K misses some ids and the teacher left mass there."""


def _coarsened(s_head: torch.Tensor, rest: torch.Tensor, target_logprobs: torch.Tensor, vocab: int):
    """The :class:`Coarse` distributions and the student's log-normaliser at T [n]."""
    t_head = target_logprobs.to(s_head.dtype)
    s_head = torch.where(t_head > -math.inf, s_head, _EMPTY)  # padding repeats slot 0's id: count it once
    log_normaliser = torch.logaddexp(rest, torch.logsumexp(s_head, dim=-1))
    t_mass, has_tail = _teacher_mass(t_head, vocab)
    t_tail = _log1mexp(torch.where(has_tail, t_mass, -1.0))
    coarse = Coarse(t_head, s_head - log_normaliser[:, None], t_tail, rest - log_normaliser, has_tail)
    return coarse, log_normaliser


def _divergence(coarse: Coarse, kind: str, tail: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence [n] between the coarsened teacher and student (before the T^2 factor);
    ``beta`` is read by JSD only."""
    t_head, q_head, t_tail, q_tail, has_tail = coarse
    if tail == "renorm":
        t_head = torch.log_softmax(t_head, dim=-1)
        q_head = torch.log_softmax(q_head, dim=-1)
    if tail != "bucket":
        has_tail = torch.zeros_like(has_tail)
    # The tail joins as a (k+1)-th class where it exists; elsewhere it is dropped (probability 0).
    t_all = torch.cat([t_head, torch.where(has_tail, t_tail, -math.inf)[:, None]], dim=-1)
    q_all = torch.cat([q_head, torch.where(has_tail, q_tail, _EMPTY)[:, None]], dim=-1)
    if kind == "fkl":
        return _kl(t_all, q_all)
    if kind == "rkl":
        # t_tail is floored so that a student tail against a (numerically) empty teacher tail is finite.
        return _kl(q_all, t_all.clamp_min(math.log(1e-12)))
    if kind == "jsd":
        m = torch.logaddexp(t_all + math.log(beta), q_all + math.log(1 - beta))
        return beta * _kl(t_all, m) + (1 - beta) * _kl(q_all, m)
    return 0.5 * (t_all.exp() - q_all.exp()).abs().sum(-1)


def _check_choices(kind: str, tail: str, beta: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown KD loss {kind!r}; choose from {DIVERGENCES}")
    if tail not in TAILS:
        raise ValueError(f"unknown tail handling {tail!r}; choose from {TAILS}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"JSD beta must be in (0, 1), got {beta}")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs; float64 stays float64 (used by the tests' references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for large |x|."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """sum over the last dim of p (log p - log q); zero where p is zero."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


def sparse_kd(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    kind: str = "fkl",
    tail: str = "bucket",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-position distillation loss against cached top-k (or any sparse) teacher targets.

    Args:
        logits: [n, V] student logits, any float dtype (computed in float32).
        target_ids: [n, k] int64 cached teacher ids, distinct within a row except padding.
        target_logprobs: [n, k] float teacher log-probabilities normalised over the full vocabulary
            (-inf: padding).
        kind: "fkl" KL(t||q), "rkl" KL(q||t), "jsd" beta KL(t||m) + (1-beta) KL(q||m) with
            m = beta t + (1-beta) q, or "tvd" half the L1 distance.
        tail: "bucket", "renorm" or "none" (module docstring).
        temperature: student logits are divided by it; the result is multiplied by its square.
        beta: JSD mixing weight, 0 < beta < 1.

    Returns:
        [n] float32 losses (float64 for float64 logits) in nats (TVD: in probability units).
    """
    return _sparse_kd(logits, target_ids, target_logprobs, kind, tail, temperature, beta)[0]


def _sparse_kd(logits, target_ids, target_logprobs, kind, tail, temperature, beta):
    """:func:`sparse_kd` and the student's log-normaliser at T (reused for CE when T = 1)."""
    _check_choices(kind, tail, beta)
    s_head, rest = _student_head_and_rest(logits, target_ids, temperature)
    coarse, log_normaliser = _coarsened(s_head, rest, target_logprobs, logits.shape[-1])
    return _divergence(coarse, kind, tail, beta) * temperature**2, log_normaliser


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of the true next token (T = 1).

    Args:
        logits: [n, V] student logits, any float dtype.
        labels: [n] int64 token ids; -100 marks positions without a label (their loss is 0).

    Returns:
        [n] float32 losses in nats.
    """
    return _cross_entropy(logits, labels, torch.logsumexp(_at_least_float32(logits), dim=-1))


def _cross_entropy(logits, labels, log_normaliser):
    picked = logits.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1).to(log_normaliser.dtype)
    return torch.where(labels >= 0, log_normaliser - picked, 0.0)


def distillation_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "fkl",
    tail: str = "bucket",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD and CE losses over a batch, computed in chunks of positions.

    Forward KL (the default) runs fused with CE and an analytic gradient (:class:`_FusedForwardKL`):
    about the cost of plain cross-entropy. The other divergences use autograd on each chunk with
    activation checkpointing.

    Args:
        logits: [B, L, V] (or [n, V]) student logits.
        target_ids: [B, L, k] int64; target_logprobs: [B, L, k] float.
        mask: [B, L] bool, positions with a teacher target (False: padding; contributes 0).
        labels: [B, L] int64 true next tokens, -100 where there is none.
        kind, tail, temperature, beta: as in :func:`sparse_kd`.
        chunk_tokens: positions per chunk; bounds the float32 working memory to chunk_tokens x V.

    Returns:
        (kd_sum, ce_sum): 0-d float32 sums over valid positions. Divide by the valid-position counts
        of the whole optimiser step (``mask.sum()``, ``(labels >= 0).sum()`` over all micro-batches
        and ranks).
    """
    flat = _flattened(logits, target_ids, target_logprobs, mask, labels)
    _check_choices(kind, tail, beta)
    if kind == "fkl":
        return _FusedForwardKL.apply(*flat, tail, temperature, chunk_tokens)
    return checkpointed_chunks(lambda *chunk: _chunk_sums(*chunk, kind, tail, temperature, beta), flat,
                                chunk_tokens, logits.requires_grad, dtype=logits.dtype, device=logits.device)


def _flattened(inputs, target_ids, target_logprobs, mask, labels) -> tuple:
    """Positions flattened: inputs [n, V or H], targets [n, k], mask and labels [n]."""
    return (inputs.reshape(-1, inputs.shape[-1]), target_ids.reshape(-1, target_ids.shape[-1]),
            target_logprobs.reshape(-1, target_logprobs.shape[-1]), mask.reshape(-1), labels.reshape(-1))


def _chunk_sums(z, ids, logprobs, valid, y, kind, tail, temperature, beta):
    """(KD sum, CE sum) of one chunk of logits, through autograd."""
    kd, log_normaliser = _sparse_kd(z, ids, logprobs, kind, tail, temperature, beta)
    if temperature != 1.0:
        log_normaliser = torch.logsumexp(_at_least_float32(z), dim=-1)
    return torch.where(valid, kd, 0.0).sum(), _cross_entropy(z, y, log_normaliser).sum()


def checkpointed_chunks(chunk_sums, flat, chunk_tokens, needs_grad, extra=None, dtype=torch.float32,
                         device=None):
    """Sum ``chunk_sums`` over chunks of positions of the tensors in ``flat`` (the first one is
    chunked with the rest; ``extra``, when given, is passed whole after it), recomputing each chunk
    in backward (activation checkpointing) so only one chunk's intermediates are alive at a time."""
    kd_total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=device)
    ce_total = torch.zeros_like(kd_total)
    for start in range(0, flat[0].shape[0], chunk_tokens):
        pieces = [x[start : start + chunk_tokens] for x in flat]
        if extra is not None:
            pieces.insert(1, extra)
        if needs_grad:
            kd, ce = checkpoint(chunk_sums, *pieces, use_reentrant=False)
        else:
            kd, ce = chunk_sums(*pieces)
        kd_total = kd_total + kd
        ce_total = ce_total + ce
    return kd_total, ce_total


def _scaled_into(work: torch.Tensor, z: torch.Tensor, temperature: float) -> torch.Tensor:
    """work = z / T in float32, reusing ``work``'s memory."""
    return torch.div(z, temperature, out=work) if temperature != 1.0 else work.copy_(z)


def _fkl_chunk_forward(z, ids, t_logprobs, kd_valid, y, tail, temperature, work):
    """Forward KL and CE of one chunk of logits ``z`` [c, V]: per-position (kd, ce) and the statistics
    backward needs [c, 3] (log-normaliser at T, log-sum-exp outside K at T, log-normaliser at 1)."""
    vocab, k = z.shape[-1], ids.shape[-1]
    work = _scaled_into(work, z, temperature)
    s_head = work.gather(-1, ids)
    picked = z.gather(-1, y.clamp_min(0)[:, None]).squeeze(-1).float()
    lse_1 = torch.logsumexp(z.float(), dim=-1) if temperature != 1.0 else None
    work.scatter_(-1, ids, -math.inf)
    rest = torch.logsumexp(work, dim=-1) if k < vocab else torch.full_like(s_head[:, 0], -math.inf)
    coarse, lse = _coarsened(s_head, rest, t_logprobs, vocab)
    if lse_1 is None:
        lse_1 = lse
    kd = torch.where(kd_valid, _divergence(coarse, "fkl", tail), 0.0) * temperature**2
    ce = torch.where(y >= 0, lse_1 - picked, 0.0)
    return kd, ce, torch.stack([lse, rest, lse_1], dim=-1)


def _fkl_chunk_grad(z, ids, t_logprobs, kd_valid, y, stats, tail, temperature, grad_kd, grad_ce, work):
    """Gradient of ``grad_kd * kd + grad_ce * ce`` with respect to one chunk of logits, in ``work``."""
    vocab = z.shape[-1]
    lse, rest = stats[:, 0], stats[:, 1]
    w_kd = grad_kd * temperature * kd_valid.float()  # d/dz = d/ds / T, times T^2
    w_ce = grad_ce * (y >= 0).float()
    work = _scaled_into(work, z, temperature)
    work.sub_(lse[:, None]).exp_()  # q at temperature T
    q_head = work.gather(-1, ids)
    t_head = t_logprobs.float()
    t_k = t_head.exp()
    if tail != "renorm":
        t_mass, has_tail = _teacher_mass(t_head, vocab)
        t_tail = torch.where(has_tail & (tail == "bucket"), -torch.expm1(t_mass), 0.0)
        c = t_k.sum(-1) + t_tail
        inverse_q_tail = torch.exp((lse - rest).clamp_max(80.0))
        outside = w_kd * (c - t_tail * inverse_q_tail)
        head = w_kd[:, None] * (c[:, None] * q_head - t_k)
    else:
        outside = torch.zeros_like(w_kd)
        t_renorm = torch.softmax(t_head, dim=-1)
        q_present = torch.where(t_head > -math.inf, q_head, 0.0)
        q_renorm = q_present / q_present.sum(-1, keepdim=True)
        head = w_kd[:, None] * (q_renorm - t_renorm)
    if temperature == 1.0:
        # CE shares the softmax: every entry gets (outside + w_ce) q_j, K and labels corrected.
        head = head + w_ce[:, None] * q_head
        work.mul_((outside + w_ce)[:, None])
    else:
        p = torch.softmax(z.float(), dim=-1)
        head = head + w_ce[:, None] * p.gather(-1, ids)
        work.mul_(outside[:, None]).add_(p * w_ce[:, None])
    head = torch.where(t_head > -math.inf, head, head[:, :1])  # padding: the same write as slot 0
    work.scatter_(-1, ids, head)
    work.scatter_add_(-1, y.clamp_min(0)[:, None], -w_ce[:, None])
    return work


class _FusedForwardKL(torch.autograd.Function):
    """Forward KL (any tail) + CE sums with an analytic gradient, chunk by chunk.

    Forward keeps only per-position statistics (O(n k)); backward recomputes the student's
    probabilities chunk by chunk in one reused float32 buffer and writes the gradient straight into
    a tensor shaped like the logits. Gradient with respect to s = z / T, per position, for the
    bucket (t_K, t_tail; q the student; c = sum_K t + t_tail):
        j in K:      T^2 (c q_j - t_j)
        j not in K:  T^2 (c q_j - t_tail q_j / q_tail)
    ("none": the same with t_tail = 0), and for renorm (t', q' renormalised over K): T^2 (q'_j - t'_j)
    on K, 0 elsewhere. CE adds p_j - [j = label] with p = softmax(z).
    """

    @staticmethod
    def forward(ctx, logits, target_ids, target_logprobs, kd_valid, labels, tail, temperature, chunk):
        n, vocab = logits.shape
        stats = torch.zeros(n, 3, dtype=torch.float32, device=logits.device)
        kd_rows = torch.zeros(n, dtype=torch.float32, device=logits.device)
        ce_rows = torch.zeros(n, dtype=torch.float32, device=logits.device)
        buffer = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            kd_rows[rows], ce_rows[rows], stats[rows] = _fkl_chunk_forward(
                logits[rows], target_ids[rows], target_logprobs[rows], kd_valid[rows], labels[rows], tail,
                temperature, buffer[: logits[rows].shape[0]])
        ctx.save_for_backward(logits, target_ids, target_logprobs, kd_valid, labels, stats)
        ctx.options = (tail, temperature, chunk)
        return kd_rows.sum(), ce_rows.sum()

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        logits, target_ids, target_logprobs, kd_valid, labels, stats = ctx.saved_tensors
        tail, temperature, chunk = ctx.options
        n, vocab = logits.shape
        grad = torch.empty_like(logits)
        buffer = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            grad[rows] = _fkl_chunk_grad(logits[rows], target_ids[rows], target_logprobs[rows], kd_valid[rows],
                                         labels[rows], stats[rows], tail, temperature, grad_kd, grad_ce,
                                         buffer[: logits[rows].shape[0]])
        return grad, None, None, None, None, None, None, None


class _FusedLinearForwardKL(torch.autograd.Function):
    """:class:`_FusedForwardKL` fused with the output projection: logits = hidden @ weight.T are
    made one chunk of positions at a time and never exist whole, in forward or backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target_ids, target_logprobs, kd_valid, labels, tail, temperature, chunk):
        n = hidden.shape[0]
        vocab = weight.shape[0]
        projection = weight.to(hidden.dtype)
        stats = torch.zeros(n, 3, dtype=torch.float32, device=hidden.device)
        kd_rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        ce_rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        buffer = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = hidden[rows] @ projection.T
            kd_rows[rows], ce_rows[rows], stats[rows] = _fkl_chunk_forward(
                z, target_ids[rows], target_logprobs[rows], kd_valid[rows], labels[rows], tail, temperature,
                buffer[: z.shape[0]])
        ctx.save_for_backward(hidden, weight, target_ids, target_logprobs, kd_valid, labels, stats)
        ctx.options = (tail, temperature, chunk)
        return kd_rows.sum(), ce_rows.sum()

    @staticmethod
    def backward(ctx, grad_kd, grad_ce):
        hidden, weight, target_ids, target_logprobs, kd_valid, labels, stats = ctx.saved_tensors
        tail, temperature, chunk = ctx.options
        n = hidden.shape[0]
        projection = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        # A frozen head (a LoRA student's) needs no gradient: a third of the backward's matmuls saved.
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        buffer = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            z = h @ projection.T
            grad_z = _fkl_chunk_grad(z, target_ids[rows], target_logprobs[rows], kd_valid[rows], labels[rows],
                                     stats[rows], tail, temperature, grad_kd, grad_ce, buffer[: z.shape[0]])
            grad_z = grad_z.to(hidden.dtype)
            grad_hidden[rows] = grad_z @ projection
            if grad_weight is not None:
                grad_weight.add_((grad_z.T @ h).float())
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "fkl",
    tail: str = "bucket",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_tokens: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`distillation_loss` from the student's final hidden states and output projection, without
    ever materialising the [B, L, V] logits: logits = hidden @ weight.T are made chunk by chunk, in
    forward and again in backward. Same values and gradients as ``distillation_loss(hidden @ weight.T,
    ...)`` (tested); peak memory is chunk_tokens x V floats instead of two [B, L, V] tensors.

    Args:
        hidden: [B, L, H] (or [n, H]) final hidden states (after the final norm).
        weight: [V, H] output projection (``model.get_output_embeddings().weight``), no bias.
        Others as in :func:`distillation_loss`.
    """
    flat = _flattened(hidden, target_ids, target_logprobs, mask, labels)
    _check_choices(kind, tail, beta)
    if kind == "fkl":
        return _FusedLinearForwardKL.apply(flat[0], weight, *flat[1:], tail, temperature, chunk_tokens)

    def chunk_sums(h, w, ids, logprobs, valid, y):
        return _chunk_sums(h @ w.to(h.dtype).T, ids, logprobs, valid, y, kind, tail, temperature, beta)

    return checkpointed_chunks(chunk_sums, flat, chunk_tokens, hidden.requires_grad or weight.requires_grad,
                                extra=weight, dtype=hidden.dtype, device=hidden.device)


class Projected(NamedTuple):
    """A student's output before its bias-free linear head, for the fused loss (logits never built)."""

    hidden: torch.Tensor
    """[B, L, H] final hidden states (after the final norm)."""
    weight: torch.Tensor
    """[V, H] output projection (``model.get_output_embeddings().weight``)."""


@dataclass(frozen=True)
class DistillationLoss:
    """The KD and CE loss of one run: built once from its settings, called once per micro-batch.

    ``loss(output, batch)`` returns ``(kd_sum, ce_sum)``, 0-d float32 sums over the batch's valid
    positions (see :func:`distillation_loss`; the caller divides by the step's counts). ``output``
    is the student's [B, L, V] logits (or a model output with ``.logits``), or :class:`Projected`
    hidden states and head weight, which computes the same values and gradients through
    :func:`linear_distillation_loss` without building the logits. ``batch`` holds ``target_ids``,
    ``target_logprobs``, ``mask`` and ``labels`` as :class:`softcache.data.StoreDataset` yields them.
    """

    divergence: str = "fkl"
    """fkl, rkl, jsd or tvd (see :func:`sparse_kd`)."""
    tail: str = "bucket"
    """bucket, renorm or none: the mass outside the cached ids (module docstring)."""
    temperature: float = 1.0
    """Student temperature; the KD part is multiplied by its square."""
    beta: float = 0.5
    """JSD mixing weight."""
    chunk_tokens: int = 256
    """Positions per chunk (bounds the float32 working memory to chunk_tokens x V)."""

    def __post_init__(self):
        _check_choices(self.divergence, self.tail, self.beta)

    def __call__(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        targets = (batch["target_ids"], batch["target_logprobs"], batch["mask"], batch["labels"])
        options = {"kind": self.divergence, "tail": self.tail, "temperature": self.temperature, "beta": self.beta,
                   "chunk_tokens": self.chunk_tokens}
        if isinstance(output, Projected):
            return linear_distillation_loss(output.hidden, output.weight, *targets, **options)
        return distillation_loss(getattr(output, "logits", output), *targets, **options)
