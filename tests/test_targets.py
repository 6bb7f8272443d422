import functools
import math

import pytest
import torch

import softcache.targets
from softcache.targets import extract_targets, sequence_seed, topk_logprobs, topp_targets
from softcache.targets import sampled_targets as _sampled_targets


@pytest.mark.parametrize("offset", [0.0, -19.0, 70.0, 200.0, -900.0])  # unshifted exp inside (-20, 77): one pass fewer
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_topk_equals_log_softmax_topk(temperature, offset):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4 + offset
    ids, values = topk_logprobs(logits, k=5, temperature=temperature)
    reference = torch.log_softmax(logits / temperature, dim=-1).topk(5, dim=-1)
    assert ids.shape == values.shape == (3, 7, 5)
    assert ids.dtype == torch.int64 and values.dtype == torch.float32
    assert torch.equal(ids, reference.indices)
    torch.testing.assert_close(values, reference.values)


def test_values_are_sorted_and_normalised_over_full_vocab():
    torch.manual_seed(1)
    logits = torch.randn(10, 30)
    _, values = topk_logprobs(logits, k=30)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    # k = V: the cached mass is the whole distribution, the tail is exactly zero.
    torch.testing.assert_close(values.exp().sum(-1), torch.ones(10))
    _, head = topk_logprobs(logits, k=3)
    tail = 1 - head.exp().sum(-1)
    assert torch.all(tail > 0) and torch.all(tail < 1)


def test_chunking_does_not_change_the_result():
    torch.manual_seed(2)
    logits = torch.randn(2, 33, 40, dtype=torch.bfloat16)
    whole = topk_logprobs(logits, k=6, chunk_rows=1000)
    chunked = topk_logprobs(logits, k=6, chunk_rows=7)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_label_logprobs_are_the_teachers_cross_entropy_at_temperature_one(temperature):
    from softcache.targets import extract_targets

    torch.manual_seed(3)
    logits = torch.randn(2, 9, 60) * 3
    labels = torch.randint(0, 60, (2, 9))
    labels[:, -1] = -100
    targets = extract_targets(logits, k=4, temperature=temperature, labels=labels, chunk_rows=5)
    reference = -torch.nn.functional.cross_entropy(logits.reshape(-1, 60), labels.reshape(-1), reduction="none",
                                                   ignore_index=-100).reshape(2, 9)
    torch.testing.assert_close(targets.label_logprobs, reference)
    assert torch.all(targets.label_logprobs[:, -1] == 0)
    ids, values = topk_logprobs(logits, k=4, temperature=temperature)
    assert torch.equal(targets.ids, ids) and torch.equal(targets.logprobs, values)


@pytest.mark.parametrize("p", [0.3, 0.9, 1.0])
def test_topp_keeps_the_fewest_ids_reaching_p(p):
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 40) * 2
    k = 12
    targets = topp_targets(logits, k, p)
    probs = torch.softmax(logits, dim=-1).sort(-1, descending=True).values
    cumulative = probs.cumsum(-1)
    expected = ((cumulative < p).sum(-1) + 1).clamp(1, k)  # the first prefix whose mass reaches p
    assert torch.equal(targets.lengths, expected)
    ids, values = topk_logprobs(logits, k)
    real = torch.arange(k) < targets.lengths[..., None]
    assert torch.equal(targets.ids[real], ids[real])
    assert torch.equal(targets.logprobs[real], values[real])
    # Padding: slot 0's id, probability zero.
    assert torch.all(targets.logprobs[~real] == -math.inf)
    assert torch.equal(targets.ids, torch.where(real, targets.ids, targets.ids[..., :1]))


@pytest.mark.parametrize("draws", ["systematic", "independent"])
def test_sampled_targets_count_draws_and_do_not_depend_on_the_batch(draws):
    torch.manual_seed(5)
    logits = torch.randn(3, 20, 30) * 2
    seeds = [sequence_seed(7, i) for i in range(3)]
    sampled_targets = functools.partial(_sampled_targets, draws=draws)
    whole = sampled_targets(logits, samples=50, seeds=seeds, chunk_rows=8)
    assert whole.ids.shape == (3, 20, 30)  # width min(samples, V)
    assert torch.all(whole.counts.sum(-1) == 50)
    assert torch.equal(whole.lengths, (whole.counts > 0).sum(-1))
    real = torch.arange(30) < whole.lengths[..., None]
    ascending = whole.ids[..., 1:] > whole.ids[..., :-1]
    assert torch.all(ascending | ~real[..., 1:])  # unique ids, ascending
    torch.testing.assert_close(whole.logprobs.exp().sum(-1), torch.ones(3, 20))
    # The same sequence alone, or with other neighbours, gets the same draws.
    alone = sampled_targets(logits[1:2], samples=50, seeds=seeds[1:2], chunk_rows=8)
    assert torch.equal(alone.ids[0], whole.ids[1]) and torch.equal(alone.counts[0], whole.counts[1])
    other = sampled_targets(logits[1:2], samples=50, seeds=[sequence_seed(8, 1)], chunk_rows=8)
    assert not torch.equal(other.counts[0], whole.counts[1])


@pytest.mark.parametrize("draws", ["systematic", "independent"])
def test_sampled_targets_are_unbiased(draws):
    sampled_targets = functools.partial(_sampled_targets, draws=draws)
    torch.manual_seed(6)
    logits = torch.randn(1, 4, 25) * 1.5
    temperature = 1.5
    teacher = torch.softmax(logits / temperature, dim=-1)[0]
    total = torch.zeros(4, 25, dtype=torch.float64)
    trials = 400
    for trial in range(trials):
        t = sampled_targets(logits, samples=20, seeds=[trial], temperature=temperature)
        total.scatter_add_(1, t.ids[0], t.logprobs[0].exp().double())
    estimate = total / trials
    # Standard error of the mean of count/20 over 400 trials is at most sqrt(0.25 / 8000) = 0.0056.
    assert (estimate - teacher).abs().max() < 0.03
    torch.testing.assert_close(estimate.sum(-1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("vocab", [30, 192, 4096])  # blocks of softcache.targets.BLOCK ids: 4096 searches by block
def test_systematic_draws_give_each_id_the_floor_or_ceiling_of_its_share(vocab):
    """N systematic draws give an id of probability p exactly floor(Np) or ceil(Np) of them, on both
    search paths (blocks when V is a multiple of BLOCK, one cumulative sum otherwise), at any temperature."""
    torch.manual_seed(vocab)
    logits = torch.randn(2, 40, vocab) * 4
    logits[0, 0] = -1e4  # one id holds all the mass but one in a million
    logits[0, 0, 7] = 0
    for samples, temperature in ((16, 1.0), (50, 0.7), (7, 2.0)):
        t = _sampled_targets(logits, samples, [3, 4], temperature=temperature, chunk_rows=16)
        p = torch.softmax(logits.double() / temperature, -1)
        drawn = torch.zeros_like(p).scatter_add_(-1, t.ids, t.counts.double())
        assert torch.all((drawn >= torch.floor(samples * p - 1e-6)) & (drawn <= torch.ceil(samples * p + 1e-6)))
        assert torch.all(t.counts.sum(-1) == samples)
    assert t.ids[0, 0, 0] == 7 and t.lengths[0, 0] == 1


def test_systematic_draws_are_the_same_on_both_search_paths(monkeypatch):
    logits = torch.randn(2, 24, 4096, generator=torch.Generator().manual_seed(1)) * 3
    blocks = _sampled_targets(logits, 20, [5, 6], chunk_rows=8)
    monkeypatch.setattr(softcache.targets, "BLOCK", 100)  # 4096 is not a multiple: one cumulative sum
    whole = _sampled_targets(logits, 20, [5, 6], chunk_rows=8)
    assert torch.equal(blocks.ids, whole.ids) and torch.equal(blocks.counts, whole.counts)


@pytest.mark.parametrize("offset", [0.0, 40.0, 100.0, -15.0, -500.0])
def test_unshifted_cpu_weights_draw_as_the_shifted_ones_and_fall_back_outside_their_range(monkeypatch, offset):
    """On a CPU, systematic draws take exp(z / T) with no max subtracted where that is safe; rows whose
    logits would overflow or underflow fall back to the shifted weights with the same uniforms, and the
    draws and label log-probabilities are those of the shifted weights throughout."""
    logits = torch.randn(2, 24, 4096, generator=torch.Generator().manual_seed(3)) * 3 + offset
    labels = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(4))
    checked = []
    safe = softcache.targets._unshifted_is_safe
    monkeypatch.setattr(softcache.targets, "_unshifted_is_safe", lambda *a: checked.append(safe(*a)) or checked[-1])
    for temperature in (1.0, 0.8):
        fast = _sampled_targets(logits, 20, [5, 6], temperature=temperature, labels=labels, chunk_rows=8)
        with monkeypatch.context() as shifted_only:
            shifted_only.setattr(softcache.targets, "_unshifted_is_safe", lambda *a: False)
            slow = _sampled_targets(logits, 20, [5, 6], temperature=temperature, labels=labels, chunk_rows=8)
        assert torch.equal(fast.ids, slow.ids) and torch.equal(fast.counts, slow.counts)
        torch.testing.assert_close(fast.label_logprobs, slow.label_logprobs, rtol=0, atol=2e-5)
        want = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1).float()
        torch.testing.assert_close(fast.label_logprobs, want, rtol=0, atol=1e-4)
    assert all(checked) == (-15 <= offset <= 40), checked  # unshifted where safe, the fallback elsewhere


def test_systematic_draws_have_less_error_than_independent_ones():
    torch.manual_seed(2)
    logits = torch.randn(1, 64, 500) * 2.5
    p = torch.softmax(logits.double(), -1)
    error = {}
    for draws in ("systematic", "independent"):
        t = _sampled_targets(logits, 30, [1], draws=draws)
        estimate = torch.zeros_like(p).scatter_add_(-1, t.ids, t.counts.double() / 30)
        error[draws] = ((estimate - p) ** 2).sum(-1).mean()
    assert error["systematic"] < error["independent"] / 2


@pytest.mark.parametrize(("vocab", "k"), [(4096, 1), (4096, 16), (49152, 64), (49152, 300), (1000, 5)])
@pytest.mark.parametrize(("group_rows", "chunk_rows"), [(512, None), (4, 3)])  # 21 rows: one group, or six
def test_block_search_top_k_is_torch_topk(vocab, k, group_rows, chunk_rows, monkeypatch):
    logits = torch.randn(3, 7, vocab, generator=torch.Generator().manual_seed(k)) * 3
    logits[0, 0, :200] = 5.0  # ties with the top, spread over several blocks
    monkeypatch.setattr(softcache.targets, "GROUP_ROWS", group_rows)
    labels = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(1))
    labels[1, 2] = -100
    fast = extract_targets(logits, k, labels=labels, chunk_rows=chunk_rows)
    want = -torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none",
                                              ignore_index=-100).reshape(3, 7)
    torch.testing.assert_close(fast.label_logprobs, want)
    monkeypatch.setattr(softcache.targets, "BLOCK", vocab + 1)  # never a multiple: torch.topk itself
    slow = extract_targets(logits, k)
    assert torch.equal(fast.logprobs, slow.logprobs)
    untied = torch.ones_like(fast.ids, dtype=torch.bool)
    untied[0, 0] = False  # tied values may come in another order of ids
    assert torch.equal(fast.ids[untied], slow.ids[untied])


def test_many_draws_search_the_whole_row_instead_of_gathering_more_than_it_holds(monkeypatch):
    """samples x BLOCK values gathered per row would outgrow the row (10^5 draws: 1.6 GB a chunk)."""
    seen = []
    searchsorted = torch.searchsorted
    monkeypatch.setattr(torch, "searchsorted", lambda sorted_, points, **kw: seen.append(sorted_.shape[-1])
                        or searchsorted(sorted_, points, **kw))
    logits = torch.randn(1, 3, 4096, generator=torch.Generator().manual_seed(2))
    t = _sampled_targets(logits, 1000, [1])
    assert seen == [4096] and torch.all(t.counts.sum(-1) == 1000)
