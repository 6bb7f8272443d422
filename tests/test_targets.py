import math

import pytest
import torch

from softcache.targets import FLOAT16_MIN, to_storage, topk_logprobs


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


def test_to_storage_narrows_and_clamps():
    ids = torch.tensor([[0, 65535]])
    values = torch.tensor([[-0.5, -1e6]])
    stored_ids, stored_values = to_storage(ids, values)
    assert stored_ids.dtype == torch.int32 and stored_values.dtype == torch.float16
    assert stored_values[0, 1].item() == FLOAT16_MIN
    assert math.isfinite(stored_values.float().exp().sum().item())


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
