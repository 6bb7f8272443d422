"""Sparse KD losses against dense references, by value and by gradient."""

from __future__ import annotations

import math

import pytest
import torch

from softcache.losses import DIVERGENCES, TAILS, cross_entropy, distillation_loss, sparse_kd

V = 40


def setup(n=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, V, generator=g, dtype=dtype) * 2).requires_grad_()
    teacher = torch.log_softmax(torch.randn(n, V, generator=g, dtype=dtype) * 3, dim=-1)
    order = teacher.argsort(dim=-1, descending=True)
    return z, teacher, order


def grad(loss, z):
    return torch.autograd.grad(loss.sum(), z, retain_graph=True)[0]


def dense_coarsened(teacher, z, k, temperature=1.0):
    """Dense (k+1)-class teacher and student log-probs, built from the full distributions."""
    q = torch.log_softmax(z / temperature, dim=-1)
    order = teacher.argsort(dim=-1, descending=True)
    t_head, q_head = teacher.gather(-1, order[:, :k]), q.gather(-1, order[:, :k])
    t_tail = torch.log1p(-t_head.exp().sum(-1, keepdim=True).clamp_max(1 - 1e-12))
    q_tail = torch.log1p(-q_head.exp().sum(-1, keepdim=True))
    return torch.cat([t_head, t_tail], -1), torch.cat([q_head, q_tail], -1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_with_k_equal_v_is_dense_kl(temperature):
    z, teacher, order = setup()
    dense = (teacher.exp() * (teacher - torch.log_softmax(z / temperature, -1))).sum(-1) * temperature**2
    sparse = sparse_kd(z, order, teacher.gather(-1, order), "fkl", "bucket", temperature)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(sparse, z), grad(dense, z), rtol=1e-4, atol=1e-7)


def test_bucket_with_k_equal_v_is_dense_kl_in_float32():
    z, teacher, order = setup(dtype=torch.float32)
    dense = (teacher.exp() * (teacher - torch.log_softmax(z, -1))).sum(-1)
    sparse = sparse_kd(z, order, teacher.gather(-1, order))
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad(sparse, z), grad(dense, z), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 39])
def test_bucket_is_kl_of_coarsened_distributions(k):
    z, teacher, order = setup(seed=k)
    t, q = dense_coarsened(teacher, z, k, temperature=1.5)
    reference = (t.exp() * (t - q)).sum(-1) * 1.5**2
    sparse = sparse_kd(z, order[:, :k], teacher.gather(-1, order[:, :k]), "fkl", "bucket", 1.5)
    torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(sparse, z), grad(reference, z), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [1, 8])
def test_renorm_is_kl_against_renormalised_topk(k):
    z, teacher, order = setup(seed=3)
    ids = order[:, :k]
    t = torch.log_softmax(teacher.gather(-1, ids), -1)
    q = torch.log_softmax(z.gather(-1, ids), -1)
    reference = (t.exp() * (t - q)).sum(-1)
    sparse = sparse_kd(z, ids, teacher.gather(-1, ids), "fkl", "renorm")
    torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(sparse, z), grad(reference, z), rtol=1e-4, atol=1e-7)
    if k == 1:
        assert torch.all(sparse.abs() < 1e-6)  # one class: nothing to match


def test_other_divergences_on_the_coarsened_distributions():
    z, teacher, order = setup(seed=5)
    k = 6
    t, q = dense_coarsened(teacher, z, k)
    m = torch.logaddexp(t + math.log(0.3), q + math.log(0.7))
    references = {
        "rkl": (q.exp() * (q - t)).sum(-1),
        "jsd": 0.3 * (t.exp() * (t - m)).sum(-1) + 0.7 * (q.exp() * (q - m)).sum(-1),
        "tvd": 0.5 * (t.exp() - q.exp()).abs().sum(-1),
    }
    for kind, reference in references.items():
        sparse = sparse_kd(z, order[:, :k], teacher.gather(-1, order[:, :k]), kind, "bucket", beta=0.3)
        torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-6, msg=kind)
        torch.testing.assert_close(grad(sparse, z), grad(reference, z), rtol=1e-4, atol=1e-6, msg=kind)


def test_losses_are_zero_when_student_equals_teacher():
    z, teacher, order = setup(seed=7)
    student = teacher.detach().clone().requires_grad_()
    for kind in DIVERGENCES:
        for tail in TAILS:
            loss = sparse_kd(student, order[:, :10], teacher.gather(-1, order[:, :10]), kind, tail)
            assert loss.abs().max() < 1e-5, (kind, tail)


def test_cross_entropy_matches_torch_and_ignores_minus_100():
    z, _, _ = setup(seed=8)
    labels = torch.arange(12) % V
    labels[3] = -100
    reference = torch.nn.functional.cross_entropy(z, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(cross_entropy(z, labels), reference)
    assert cross_entropy(z, labels)[3] == 0


def batch(B=4, L=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g).requires_grad_()
    teacher = torch.log_softmax(torch.randn(B, L, V, generator=g) * 3, -1)
    top = teacher.topk(k, dim=-1)
    mask = torch.ones(B, L, dtype=torch.bool)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, -1] = -100
    return logits, top.indices, top.values, mask, labels


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_chunked_sums_equal_unchunked(temperature):
    logits, ids, values, mask, labels = batch()
    kd_a, ce_a = distillation_loss(logits, ids, values, mask, labels, temperature=temperature, chunk_tokens=5)
    flat = logits.reshape(-1, V)
    kd_b = sparse_kd(flat, ids.reshape(-1, 5), values.reshape(-1, 5), temperature=temperature).sum()
    ce_b = cross_entropy(flat, labels.reshape(-1)).sum()
    torch.testing.assert_close(kd_a, kd_b)
    torch.testing.assert_close(ce_a, ce_b)
    g_a = torch.autograd.grad(kd_a + ce_a, logits)[0]
    g_b = torch.autograd.grad(kd_b + ce_b, logits)[0]
    torch.testing.assert_close(g_a, g_b)


def test_fully_masked_batch_gives_zero_not_nan():
    logits, ids, values, mask, labels = batch()
    mask[:] = False
    labels[:] = -100
    ids.zero_()
    values.zero_()  # what padding rows hold
    kd, ce = distillation_loss(logits, ids, values, mask, labels)
    count = mask.sum().clamp_min(1)
    loss = (kd + ce) / count
    assert loss.item() == 0.0
    g = torch.autograd.grad(loss, logits)[0]
    assert torch.all(g == 0)


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    logits, ids, values, mask, labels = batch(B=8, seed=4)
    mask[5, 2:] = False  # uneven valid counts across micro-batches
    labels[5, 2:] = -100
    weights = torch.nn.Parameter(torch.randn(V, V) * 0.1)

    def sums(rows):
        out = logits[rows].detach() @ weights
        return distillation_loss(out, ids[rows], values[rows], mask[rows], labels[rows])

    kd_count, ce_count = mask.sum().clamp_min(1), (labels >= 0).sum().clamp_min(1)
    kd, ce = sums(slice(0, 8))
    ((kd / kd_count + ce / ce_count)).backward()
    big = weights.grad.clone()
    weights.grad = None
    for start in range(0, 8, 2):  # 4 micro-batches, each divided by the step's total counts
        kd, ce = sums(slice(start, start + 2))
        (kd / kd_count + ce / ce_count).backward()
    torch.testing.assert_close(weights.grad, big, rtol=1e-5, atol=1e-7)


def test_bad_choices_raise():
    logits, ids, values, _, _ = batch()
    with pytest.raises(ValueError, match="unknown KD loss"):
        sparse_kd(logits.reshape(-1, V), ids.reshape(-1, 5), values.reshape(-1, 5), kind="kl2")
    with pytest.raises(ValueError, match="unknown tail"):
        sparse_kd(logits.reshape(-1, V), ids.reshape(-1, 5), values.reshape(-1, 5), tail="drop")
    with pytest.raises(ValueError, match="beta"):
        sparse_kd(logits.reshape(-1, V), ids.reshape(-1, 5), values.reshape(-1, 5), kind="jsd", beta=1.0)


def test_float16_targets_with_a_rounded_up_mass_stay_finite():
    z, teacher, order = setup(seed=9, dtype=torch.float32)
    values = teacher.gather(-1, order).half().float()  # k = V, sum of exp may exceed 1 slightly
    for kind in DIVERGENCES:
        loss = sparse_kd(z, order, values, kind)
        assert torch.isfinite(loss).all() and torch.isfinite(grad(loss, z)).all()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("k", [3, V])
def test_fused_forward_kl_matches_autograd(tail, temperature, k):
    """distillation_loss takes the fused analytic path for fkl; it must equal plain autograd."""
    logits, _, _, mask, labels = batch(B=3, L=5, seed=11)
    teacher = torch.log_softmax(torch.randn(3, 5, V, generator=torch.Generator().manual_seed(12)) * 3, -1)
    top = teacher.topk(k, dim=-1)
    mask[2, 3:] = False
    labels[2, 2:] = -100
    kd, ce = distillation_loss(logits, top.indices, top.values, mask, labels, "fkl", tail, temperature, chunk_tokens=4)
    flat = logits.reshape(-1, V)
    per_kd = sparse_kd(flat, top.indices.reshape(-1, k), top.values.reshape(-1, k), "fkl", tail, temperature)
    kd_ref = torch.where(mask.reshape(-1), per_kd, 0.0).sum()
    ce_ref = cross_entropy(flat, labels.reshape(-1)).sum()
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
    g_fused = torch.autograd.grad(0.3 * kd + 0.7 * ce, logits)[0]
    g_ref = torch.autograd.grad(0.3 * kd_ref + 0.7 * ce_ref, logits)[0]
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-6)


def test_fused_forward_kl_in_bfloat16_logits():
    logits, ids, values, mask, labels = batch(seed=13)
    low = logits.detach().bfloat16().requires_grad_()
    kd, ce = distillation_loss(low, ids, values, mask, labels)
    g = torch.autograd.grad(kd + ce, low)[0]
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    kd_ref, ce_ref = distillation_loss(low.float(), ids, values, mask, labels)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-4)


def padded(ids: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, width: int):
    """Targets cut to ``lengths`` entries per row and padded to ``width`` the way stores pad them."""
    slots = torch.arange(width)
    ids = torch.cat([ids, ids[..., :1].expand(*ids.shape[:-1], width - ids.shape[-1])], -1)
    values = torch.cat([values, values.new_full((*values.shape[:-1], width - values.shape[-1]), -math.inf)], -1)
    real = slots < lengths[..., None]
    return torch.where(real, ids, ids[..., :1]), values.masked_fill(~real, -math.inf)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_padding_entries_change_nothing(kind, tail):
    """A row with n real entries padded to k gives the loss and gradient of the same n entries alone."""
    logits, _, _, mask, labels = batch(B=2, L=4, seed=21)
    teacher = torch.log_softmax(torch.randn(2, 4, V, generator=torch.Generator().manual_seed(22)) * 3, -1)
    top = teacher.topk(6, dim=-1)
    lengths = torch.tensor([[1, 2, 3, 6], [6, 4, 5, 2]])
    ids, values = padded(top.indices, top.values, lengths, 6)
    kd, ce = distillation_loss(logits, ids, values, mask, labels, kind, tail, chunk_tokens=3)
    g = torch.autograd.grad(kd + ce, logits)[0]
    flat = logits.reshape(-1, V)
    reference_kd = sum(
        sparse_kd(flat[i : i + 1], top.indices.reshape(-1, 6)[i : i + 1, :n], top.values.reshape(-1, 6)[i : i + 1, :n],
                  kind, tail)
        for i, n in enumerate(lengths.reshape(-1).tolist())
    ).sum()
    reference_ce = cross_entropy(flat, labels.reshape(-1)).sum()
    torch.testing.assert_close(kd, reference_kd, rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(reference_kd + reference_ce, logits)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_sampled_targets_give_the_full_kd_gradient_in_expectation():
    """With tail "none", the gradient against count/N targets is q - t~, whose mean is the dense
    forward-KL gradient q - t."""
    from softcache.targets import sampled_targets

    g = torch.Generator().manual_seed(31)
    z = (torch.randn(1, 3, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher_logits = torch.randn(1, 3, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(teacher_logits, -1)
    dense = (teacher.exp() * (teacher - torch.log_softmax(z, -1))).sum()
    expected = torch.autograd.grad(dense, z)[0]
    mask = torch.ones(1, 3, dtype=torch.bool)
    labels = torch.full((1, 3), -100)
    total = torch.zeros_like(z)
    trials = 300
    for trial in range(trials):
        t = sampled_targets(teacher_logits.float(), samples=16, seeds=[trial])
        kd, _ = distillation_loss(z, t.ids.clone(), t.logprobs.double(), mask, labels, "fkl", "none")
        total += torch.autograd.grad(kd, z)[0]
    # Each entry of q - t~ has standard deviation at most 0.5 / sqrt(16); the mean of 300 draws 0.007.
    assert (total / trials - expected).abs().max() < 0.03
    # A single draw is far noisier than that, so the average is what matches.
    single = torch.autograd.grad(distillation_loss(z, t.ids.clone(), t.logprobs.double(), mask, labels, "fkl", "none")[0], z)[0]
    assert (single - expected).abs().max() > (total / trials - expected).abs().max()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_linear_loss_equals_the_loss_on_materialised_logits(kind, tail, temperature):
    """From hidden states and the output projection, never building [B, L, V]: same values, same
    gradients for the hidden states and the weight."""
    from softcache.losses import linear_distillation_loss

    g = torch.Generator().manual_seed(41)
    hidden = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, 12, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    teacher = torch.log_softmax(torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3, -1).topk(6, dim=-1)
    ids, values = padded(teacher.indices, teacher.values, torch.tensor([[1, 6, 3, 6, 2], [6, 6, 4, 5, 6]]), 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[:, -1] = -100
    kd, ce = linear_distillation_loss(hidden, weight, ids, values, mask, labels, kind, tail, temperature, chunk_tokens=3)
    kd_ref, ce_ref = distillation_loss(hidden @ weight.T, ids, values, mask, labels, kind, tail, temperature,
                                       chunk_tokens=4)
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(ce, ce_ref)
    grads = torch.autograd.grad(0.3 * kd + 0.7 * ce, (hidden, weight))
    grads_ref = torch.autograd.grad(0.3 * kd_ref + 0.7 * ce_ref, (hidden, weight))
    for got, want in zip(grads, grads_ref):  # the fused paths work in float32 chunks
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_linear_loss_with_a_frozen_head_gives_the_hidden_gradient_alone():
    """A LoRA student's head is frozen: the fused forward KL skips its gradient, not the hidden states'."""
    from softcache.losses import linear_distillation_loss

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 12, generator=g, dtype=torch.float64) * 0.5
    teacher = torch.log_softmax(torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3, -1).topk(6, dim=-1)
    labels = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    frozen = linear_distillation_loss(hidden, weight, teacher.indices, teacher.values, mask, labels, chunk_tokens=3)
    trained = linear_distillation_loss(hidden, weight.clone().requires_grad_(), teacher.indices, teacher.values, mask,
                                       labels, chunk_tokens=3)
    grad = torch.autograd.grad(sum(frozen), hidden)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(sum(trained), hidden)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_loss_object_is_the_loss_functions_behind_one_call(kind):
    """DistillationLoss(settings)(output, batch): logits and Projected(hidden, weight) give the values
    and gradients of distillation_loss and linear_distillation_loss with the same settings."""
    from softcache.losses import DistillationLoss, Projected, linear_distillation_loss

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 4, V, generator=g, dtype=torch.float64) * 2, -1).topk(5, dim=-1)
    labels = torch.randint(0, V, (2, 4), generator=g)
    labels[:, -1] = -100
    batch = {"target_ids": teacher.indices, "target_logprobs": teacher.values,
             "mask": torch.tensor([[True] * 4, [True, True, False, False]]), "labels": labels}
    loss = DistillationLoss(kind, "bucket", temperature=1.5, beta=0.3, chunk_tokens=3)
    settings = (kind, "bucket", 1.5, 0.3, 3)
    args = (batch["target_ids"], batch["target_logprobs"], batch["mask"], labels)
    logits = hidden @ weight.T
    for got, want in ((loss(logits, batch), distillation_loss(logits, *args, *settings)),
                      (loss(Projected(hidden, weight), batch), linear_distillation_loss(hidden, weight, *args, *settings))):
        torch.testing.assert_close(got, want)
        grads = torch.autograd.grad(got[0] + got[1], (hidden, weight), retain_graph=True)
        grads_ref = torch.autograd.grad(want[0] + want[1], (hidden, weight), retain_graph=True)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="unknown tail"):
        DistillationLoss("fkl", "drop")
    with pytest.raises(ValueError, match="beta"):
        DistillationLoss("jsd", beta=1.0)
