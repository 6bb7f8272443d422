"""Masked and documents stores (chat corpora) through the teacher job, the reader and the student.

The corpus is packed by hand here (documents of random tokens, each with a span that teaches), so
these tests check the store and the two jobs whatever the corpus reader does: a packed document's
targets equal the teacher's on that document alone, positions that do not teach hold no target
bytes, and a student's loss and gradients on a packed batch equal those on the documents apart.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softcache import open_store
from softcache.cache_job import TeacherJob
from softcache.chat import teaching_positions
from softcache.corpus import PackedCorpus
from softcache.data import StoreDataset
from softcache.losses import DistillationLoss

from conftest import interrupted, store_files

SEQ_LEN = 32


def documents(seed: int = 0, count: int = 30, vocab: int = 300) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [T], teach [T]) per document: a prompt, then a reply whose tokens teach (as chat.render marks
    them), then sometimes a second prompt and reply."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        turns = [(rng.integers(2, vocab, rng.integers(2, 7)), False) for _ in range(rng.integers(1, 3))]
        parts = [piece for prompt, _ in turns for piece in ((prompt, False), (rng.integers(2, vocab, rng.integers(1, 9)), True))]
        ids = np.concatenate([p for p, _ in parts]).astype(np.uint32)
        assistant = np.concatenate([np.full(len(p), t) for p, t in parts])
        out.append((ids, teaching_positions(assistant)))
    return out


def pack_by_hand(docs, seq_len: int = SEQ_LEN, pad: int = 1) -> PackedCorpus:
    """Whole documents in order, a new row when the next does not fit; the rest of a row is padding."""
    rows, row = [], []
    for doc in docs:
        if sum(len(ids) for ids, _ in row) + len(doc[0]) > seq_len:
            rows.append(row)
            row = []
        row.append(doc)
    rows.append(row)
    ids = np.full((len(rows), seq_len), pad, dtype=np.uint32)
    teach = np.zeros((len(rows), seq_len), dtype=bool)
    segments = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for number, (doc_ids, doc_teach) in enumerate(row):
            ids[r, at:at + len(doc_ids)], teach[r, at:at + len(doc_ids)] = doc_ids, doc_teach
            segments[r, at:at + len(doc_ids)] = number
            at += len(doc_ids)
        segments[r, at:] = len(row)  # padding: a segment of its own
    return PackedCorpus(input_ids=ids, source="by hand", documents=len(docs), tokens_read=int(ids.size),
                        dropped_tokens=0, teach=teach, segments=segments, packing="documents", long="truncate")


def row_documents(store_rows: dict, row: int):
    """(start, stop) of each document of a read row, padding included as its last segment."""
    segments = store_rows["segments"][row]
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
    return list(zip(starts, np.r_[starts[1:], len(segments)]))


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()


@pytest.mark.parametrize("format_name,values", [("zarr", "float16"), ("arrow", "log8")])
def test_packed_targets_equal_each_document_alone(cache_config, teacher_model, format_name, values):
    corpus = pack_by_hand(documents())
    config = cache_config(format=format_name, values=values, ids="plain", k=8, max_sequences=None)
    result, = TeacherJob(config, corpus=corpus).run()
    store = open_store(config.out)
    assert result.manifest["format_version"] == 4
    assert result.manifest["encoding"]["masked"] and result.manifest["encoding"]["documents"]
    rows = store.read(0, len(store))
    np.testing.assert_array_equal(rows["teach"], corpus.teach)
    np.testing.assert_array_equal(rows["segments"], corpus.segments)
    # Positions that do not teach store no target bytes: lengths 0, entries only for teaching positions.
    columns = store.read_columns(np.arange(len(store)))
    assert (columns["target_lengths"][~corpus.teach] == 0).all()
    assert len(columns["target_values"].values) == 8 * corpus.teach.sum()
    checked = 0
    nll, counted = 0.0, 0
    for row in range(len(store)):
        for start, stop in row_documents(rows, row):
            if not corpus.teach[row, start:stop].any():
                continue  # the row's padding
            alone = torch.from_numpy(corpus.input_ids[row, start:stop].astype(np.int64))[None]
            with torch.inference_mode():
                logits = teacher_model(input_ids=alone).logits[0].float()
            teach = corpus.teach[row, start:stop]
            reference = torch.log_softmax(logits, -1).topk(8, -1)
            np.testing.assert_array_equal(rows["target_ids"][row, start:stop][teach], reference.indices.numpy()[teach])
            tolerance = 0.1 if values == "log8" else 2e-3
            assert np.abs(rows["target_logprobs"][row, start:stop][teach] - reference.values.numpy()[teach]).max() < tolerance
            labels = alone[0, 1:]
            picked = torch.log_softmax(logits[:-1], -1).gather(-1, labels[:, None])[:, 0].numpy()
            nll -= picked[teach[:-1]].sum()
            counted += int(teach.sum())
            checked += int(teach.sum())
    assert checked == corpus.teach.sum() > 0
    # The teacher's cross-entropy is over the positions that teach.
    assert store.manifest["totals"]["teacher_ce"] == pytest.approx(nll / counted, rel=1e-4)
    assert store.verify() == []


def test_chat_store_resumes_converts_and_verifies(cache_config, tmp_path, monkeypatch):
    from softcache import background
    from softcache.store.convert import convert_store

    corpus = pack_by_hand(documents(seed=1, count=40))
    whole = cache_config(out=str(tmp_path / "whole"), max_sequences=None, shard_size=3)
    TeacherJob(whole, corpus=corpus).run()
    resumed = cache_config(out=str(tmp_path / "resumed"), max_sequences=None, shard_size=3)
    interrupted(monkeypatch, background.StoreWriter, "write_shard", 3,
                lambda: TeacherJob(resumed, corpus=corpus).run())
    assert not open_store(resumed.out, allow_incomplete=True).complete
    TeacherJob(resumed, corpus=corpus).run()
    assert store_files(tmp_path / "whole") == store_files(tmp_path / "resumed")
    manifest = convert_store(whole.out, tmp_path / "arrow", "arrow")
    converted = open_store(tmp_path / "arrow")
    assert manifest["totals"]["content_sha256"] == open_store(whole.out).totals.content_sha256
    assert converted.verify() == []
    np.testing.assert_array_equal(converted.read(0, len(converted))["segments"], corpus.segments)


def test_student_loss_and_gradients_on_a_packed_batch_equal_the_documents_apart(cache_config, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from softcache.train_job import StudentJob

    corpus = pack_by_hand(documents(seed=2, count=12))
    config = cache_config(max_sequences=None, k=8)
    TeacherJob(config, corpus=corpus).run()
    batch = StoreDataset(config.out, batch_size=4, shuffle=False, epochs=1).read(np.arange(4))
    assert (batch["mask"] == torch.from_numpy(corpus.teach[:4])).all()
    assert ((batch["labels"] >= 0) == batch["mask"]).all()  # CE counts the same positions as KD
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    with torch.no_grad():  # sharper than the default init, so context matters to the loss
        student.lm_head.weight.mul_(20)
    loss = DistillationLoss("fkl", "bucket", 1.0, 0.5, 64)

    job = StudentJob.__new__(StudentJob)  # only its forward step: the model, no store or run directory
    job.trained = job.model = student
    job.fused, job.device, job.autocast = False, torch.device("cpu"), None
    packed_kd, packed_ce = loss(job.forward(batch), batch)
    (packed_kd + packed_ce).backward()
    packed_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    apart_kd = apart_ce = 0.0
    rows = {name: batch[name].numpy() for name in ("segments",)}
    for row in range(4):
        for start, stop in row_documents(rows, row):
            piece = {name: batch[name][row:row + 1, start:stop] for name in
                     ("input_ids", "target_ids", "target_logprobs", "mask", "labels")}
            kd, ce = loss(student(input_ids=piece["input_ids"]).logits, piece)
            apart_kd, apart_ce = apart_kd + kd, apart_ce + ce
    (apart_kd + apart_ce).backward()
    torch.testing.assert_close(packed_kd, apart_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_ce, apart_ce, rtol=1e-5, atol=1e-5)
    for packed, p in zip(packed_grads, student.parameters()):
        torch.testing.assert_close(packed, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()))
    # Without the document mask the same batch gives another loss: the test can tell.
    leaky, _ = loss(student(input_ids=batch["input_ids"]).logits, batch)
    assert (leaky - packed_kd).abs() > 100 * (1e-5 + 1e-5 * packed_kd.abs())


def test_builtin_chat_corpus_is_fixed_split_and_valid():
    from softcache.chat import InputShape, conversation
    from softcache.chat_corpus import CHUNK_CHARS, python_docs_chat

    train, heldout, every = python_docs_chat("train"), python_docs_chat("heldout"), python_docs_chat("all")
    assert len(train) + len(heldout) == len(every) and len(heldout) > 20
    assert {r["topic"] for r in train}.isdisjoint({r["topic"] for r in heldout})
    assert python_docs_chat("train") == train  # the same rows every time
    for index, row in enumerate(every):
        conversation(row, InputShape.MESSAGES, index)  # a valid conversation that teaches
        roles = [turn["role"] for turn in row["messages"]]
        assert roles in (["user", "assistant"], ["user", "assistant", "user", "assistant"])
        assert all(turn["content"].strip() for turn in row["messages"])
    # Answers are the documentation's text, cut at paragraph (or line) boundaries.
    from pydoc_data.topics import topics

    answers = [turn["content"] for row in every for turn in row["messages"] if turn["role"] == "assistant"]
    assert all(paragraph in topics[row["topic"]] for row in every for turn in row["messages"]
               if turn["role"] == "assistant" for paragraph in turn["content"].split("\n\n"))
    assert sum(len(a) <= CHUNK_CHARS for a in answers) / len(answers) > 0.95


def test_fused_student_sees_packed_documents_alone_too(cache_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    from softcache.student import Trunk
    from softcache.train_job import StudentJob

    corpus = pack_by_hand(documents(seed=3, count=10))
    config = cache_config(max_sequences=None, k=8)
    TeacherJob(config, corpus=corpus).run()
    batch = StoreDataset(config.out, batch_size=3, shuffle=False, epochs=1).read(np.arange(3))
    torch.manual_seed(1)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                           tie_word_embeddings=False))
    loss = DistillationLoss("fkl", "bucket", 1.0, 0.5, 64)
    job = StudentJob.__new__(StudentJob)
    job.model, job.device, job.autocast = student, torch.device("cpu"), None
    results = []
    for fused in (False, True):
        job.fused, job.trained = fused, Trunk(student) if fused else student
        results.append(loss(job.forward(batch), batch))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
