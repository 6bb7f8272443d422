import math

import pytest
import torch

from softcache.targets import sampled_targets, sequence_seed, topk_logprobs, topp_targets


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_topk_equals_log_softmax_topk(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 4
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


def test_sampled_targets_count_draws_and_do_not_depend_on_the_batch():
    torch.manual_seed(5)
    logits = torch.randn(3, 20, 30) * 2
    seeds = [sequence_seed(7, i) for i in range(3)]
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


def test_sampled_targets_are_unbiased():
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
