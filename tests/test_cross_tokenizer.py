"""softcache.vocab_map and softcache.cross_losses: a teacher's cached targets over another tokenizer's
vocabulary, checked on hand-worked tiny vocabularies and on tokenizers trained here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softcache.cross_losses import project_targets, uld
from softcache.losses import sparse_kd
from softcache.vocab_map import UNMAPPED, build_map, token_bytes

from conftest import train_tokenizer


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer as Llama 2's is written: ▁ for spaces, <0xNN> byte-fallback tokens in
    the vocabulary, </s> special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<0x0A>": 2, "▁": 3, "t": 4, "h": 5, "e": 6, "▁t": 7, "he": 8, "▁the": 9}
    core = Tokenizer(models.BPE(vocab, [("▁", "t"), ("h", "e"), ("▁t", "he")], unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("a"), 400)


@pytest.fixture(scope="module")
def byte_level_small(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("b"), 300)


def test_token_bytes_of_both_families(byte_level):
    pieces = token_bytes(byte_level)
    assert pieces[byte_level.eos_token_id] is None and pieces[byte_level.unk_token_id] is None
    for text in (" the", "def", "\n"):
        ids = byte_level(text, add_special_tokens=False)["input_ids"]
        assert b"".join(pieces[i] for i in ids) == text.encode()
    meta = metaspace_tokenizer()
    pieces = token_bytes(meta)
    assert pieces[:10] == [None, None, b"\n", b" ", b"t", b"h", b"e", b" t", b"he", b" the"]
    assert meta("the\n", add_special_tokens=False)["input_ids"] == [9, 2]
    # Across the two families, a token maps where its bytes are the same.
    assert build_map(meta, byte_level).student_of[9] == byte_level.convert_tokens_to_ids("Ġthe")


def test_a_map_joins_tokens_of_the_same_bytes(byte_level, byte_level_small):
    vocab_map = build_map(byte_level, byte_level_small)
    teacher, student = token_bytes(byte_level), token_bytes(byte_level_small)
    for t, s in enumerate(vocab_map.student_of):
        if s != UNMAPPED and teacher[t] is not None:
            assert student[s] == teacher[t]
        elif teacher[t] is not None:
            assert teacher[t] not in set(student)
    assert vocab_map.student_of[byte_level.eos_token_id] == byte_level_small.eos_token_id
    assert 250 < vocab_map.mapped < 400  # the smaller vocabulary's merges are mostly the larger's first ones


def test_the_same_tokenizer_maps_every_id_to_itself(byte_level):
    vocab_map = build_map(byte_level, byte_level)
    np.testing.assert_array_equal(vocab_map.student_of, np.arange(len(byte_level)))


def test_a_special_token_of_other_text_at_the_same_id_is_not_itself():
    """Two vocabularies alike but for one chat marker's text: that marker maps nowhere, the rest to themselves."""
    from tokenizers import decoders, pre_tokenizers

    from conftest import CHATML, fast_tokenizer, train_bpe

    def chat(marker: str):
        core = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                         ["<eos>", marker, "<|im_end|>"], pre_tokenizers.ByteLevel.alphabet())
        return fast_tokenizer(core, CHATML, eos_token="<|im_end|>")

    teacher, student = chat("<|im_start|>"), chat("<|user|>")
    student_of = build_map(teacher, student).student_of
    marker = teacher.convert_tokens_to_ids("<|im_start|>")
    assert student.convert_ids_to_tokens(marker) == "<|user|>" and student_of[marker] == UNMAPPED
    others = np.array([i for i in range(len(teacher)) if i != marker and teacher.convert_ids_to_tokens(i) != "<unk>"])
    np.testing.assert_array_equal(student_of[others], others)


def test_projection_by_hand():
    # Teacher vocabulary 5, student 5: teacher 0 -> 2, 1 -> none, 2 -> 0, 3 -> 0, 4 -> 3.
    student_of = torch.tensor([2, UNMAPPED, 0, 0, 3])
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.05]], dtype=torch.float64)
    ids, logprobs, matched = project_targets(torch.tensor([[0, 1, 2, 3]]), probs.log(), student_of, 5)
    assert matched.tolist() == [True]
    held = {int(i): float(p.exp()) for i, p in zip(ids[0], logprobs[0]) if p > -math.inf}
    assert held == pytest.approx({2: 0.4, 0: 0.25})  # 0.2 + 0.05 summed; teacher id 1's 0.3 joins the tail
    assert ids[0].tolist() == [2, 2, 0, 2]  # in the teacher's slots; padding repeats slot 0's id
    logits = torch.tensor([[0.5, -1.0, 1.5, 0.0, 0.7]], dtype=torch.float64)
    q = torch.softmax(logits, -1)[0]
    t = {0: 0.25, 2: 0.4, "tail": 0.35}
    qs = {0: q[0], 2: q[2], "tail": q[1] + q[3] + q[4]}
    want = sum(p * math.log(p / qs[c]) for c, p in t.items())
    assert float(sparse_kd(logits, ids, logprobs)[0]) == pytest.approx(want, rel=1e-12)


def test_a_row_with_nothing_matched_is_all_tail():
    ids, logprobs, matched = project_targets(torch.tensor([[1, 1]]), torch.tensor([[-0.1, -math.inf]]),
                                             torch.tensor([0, UNMAPPED]), 3)
    assert matched.tolist() == [False] and torch.isinf(logprobs).all()
    with pytest.raises(ValueError, match="2 cached ids per position for a student vocabulary of 2"):
        project_targets(torch.tensor([[1, 1]]), torch.tensor([[-0.1, -math.inf]]), torch.tensor([0, UNMAPPED]), 2)


def test_with_the_same_vocabulary_every_loss_is_unchanged_bit_for_bit():
    torch.manual_seed(0)
    vocab, k = 50, 8
    logits = torch.randn(6, vocab, dtype=torch.float64) * 3
    teacher = torch.log_softmax(torch.randn(6, vocab, dtype=torch.float64) * 2, -1)
    target_logprobs, target_ids = teacher.topk(k, -1)
    target_ids[0, 5:], target_logprobs[0, 5:] = target_ids[0, 0], -math.inf  # a padded row
    ids, logprobs, matched = project_targets(target_ids, target_logprobs, torch.arange(vocab), vocab)
    assert matched.all() and torch.equal(ids, target_ids) and torch.equal(logprobs, target_logprobs)
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        assert torch.equal(sparse_kd(logits, ids, logprobs, kind), sparse_kd(logits, target_ids, target_logprobs, kind))


def test_uld_by_hand_and_its_bounds():
    teacher = torch.tensor([[0.1, 0.6, 0.2]], dtype=torch.float64).log()  # cached k = 3 of a larger vocabulary
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    q = torch.softmax(logits, -1)[0].sort(descending=True).values
    want = abs(0.6 - q[0]) + abs(0.2 - q[1]) + abs(0.1 - q[2]) + abs(0.1 - (1 - q[:3].sum()))
    assert float(uld(logits, teacher)[0]) == pytest.approx(float(want), rel=1e-12)
    # Permuting the student's vocabulary changes nothing (no id is compared); with k = V it is the sorted L1.
    full = torch.log_softmax(torch.randn(4, 7, dtype=torch.float64), -1)
    student = torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(uld(student, full), uld(student[:, torch.randperm(7)], full))
    dense = (full.exp().sort(-1, descending=True).values - torch.softmax(student, -1).sort(-1, descending=True).values)
    assert torch.allclose(uld(student, full), dense.abs().sum(-1))
    assert torch.allclose(uld(torch.log(full.exp()), full), torch.zeros(4, dtype=torch.float64), atol=1e-12)
