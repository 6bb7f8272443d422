"""Packed documents see only themselves: a packed row's logits, losses and gradients equal those of
each document run alone."""

from __future__ import annotations

import pytest
import torch

from softcache.packing import crosses_documents, document_mask, document_positions, document_starts

LENGTHS = [(5, 7, 4), (16,), (1, 3, 1, 11)]


def _segments(lengths) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def test_positions_restart_and_the_mask_is_block_diagonal_causal():
    segments = _segments((2, 3))
    assert document_positions(segments).tolist() == [[0, 1, 0, 1, 2]]
    assert document_starts(segments).tolist() == [[True, False, True, False, False]]
    assert crosses_documents(segments).tolist() == [[False, True, False, False, True]]
    mask = document_mask(segments)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_equal_neighbouring_ids_in_a_batch_are_separate_documents_per_row():
    segments = torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]])
    assert document_positions(segments).tolist() == [[0, 1, 0, 1], [0, 1, 2, 3]]
    assert not document_mask(segments)[0, 0, 2, 1] and document_mask(segments)[1, 0, 3, 0]


def _model(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {"llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64),
                "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=64)}[kind]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, vocab_size=97, **settings),
                                            attn_implementation="sdpa")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_a_packed_row_gives_each_document_its_logits_alone(kind, lengths):
    model = _model(kind).eval()
    segments = _segments(lengths)
    ids = torch.randint(0, 97, segments.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = model(ids, attention_mask=document_mask(segments), position_ids=document_positions(segments)).logits
        alone = torch.cat([model(part).logits for part in ids.split(list(lengths), dim=1)], dim=1)
        unmasked = model(ids).logits
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    if len(lengths) > 1:  # the check can fail: without the mask the later documents see the earlier ones
        assert (unmasked - alone).abs().max() > 1e-3


def test_a_packed_row_gives_the_summed_loss_and_gradients_of_its_documents():
    lengths = (6, 9, 5)
    segments = _segments(lengths)
    ids = torch.randint(0, 97, segments.shape, generator=torch.Generator().manual_seed(2))

    def summed_ce(model, logits, ids, keep):
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
        return (losses * keep[0, :-1]).sum()

    packed_model, alone_model = _model("llama"), _model("llama")
    keep = (~crosses_documents(segments)).float()
    logits = packed_model(ids, attention_mask=document_mask(segments), position_ids=document_positions(segments)).logits
    summed_ce(packed_model, logits, ids, keep).backward()
    total = 0
    for part in ids.split(list(lengths), dim=1):
        total = total + summed_ce(alone_model, alone_model(part).logits, part, torch.ones_like(part).float())
    total.backward()
    for (name, a), (_, b) in zip(packed_model.named_parameters(), alone_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
