"""softcache.alignment, softcache.view and the cross-tokenizer student job (--tokenizers cross): a store
written by one tokenizer's teacher, students of another tokenizer trained through a view."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from softcache import SoftcacheError
from softcache.alignment import Aligner
from softcache.cache_job import run_cache
from softcache.cli import main
from softcache.config import CacheConfig, TrainConfig
from softcache.cross_losses import CrossTokenizerLoss, uld
from softcache.losses import distillation_loss
from softcache.store import open_store
from softcache.train_job import run_train
from softcache.view import View, build_view

from conftest import interrupted, make_teacher, python_docs, train_tokenizer
from test_cross_tokenizer import metaspace_tokenizer


@pytest.fixture(scope="module")
def setting(tmp_path_factory, corpus_file):
    """A store of the tiny teacher (vocabulary 384), a student directory with a tokenizer of 300 trained on
    the same text, and that student's view of the store."""
    root = tmp_path_factory.mktemp("cross")
    teacher = make_teacher(root / "teacher", seed=1)
    run_cache(CacheConfig(teacher=str(teacher), data=str(corpus_file), out=str(root / "store"), seq_len=32,
                          max_sequences=40, targets="topk", k=8, batch_size=8, shard_size=8, progress=False))
    student = root / "student"
    tokenizer = train_tokenizer(student, 300)
    (student / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}))
    same = root / "same-student"  # the teacher's own tokenizer beside a student config
    shutil.copytree(root / "store" / "tokenizer", same)
    config = json.loads((student / "config.json").read_text())
    (same / "config.json").write_text(json.dumps({**config, "vocab_size": 384}))
    return {"root": root, "store": root / "store", "student": student, "tokenizer": tokenizer, "same": same,
            "teacher": teacher}


def train(setting, out, **overrides):
    options = dict(store=str(setting["store"]), student=str(setting["student"]), out=str(out), steps=6,
                   batch_size=4, lr=5e-3, eval_fraction=0.2, checkpoint_every=2, num_workers=0, progress=False,
                   tokenizers="cross", view=str(setting["root"] / "view"))
    options.update(overrides)
    return run_train(TrainConfig(**options))


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- alignment -------------------------------------------------------------------------------------

def _aligned_prefixes_agree(teacher, student, ids, alignment):
    """At every aligned position both prefixes are the same text and both next tokens start where they end."""
    pieces_t = [teacher.convert_ids_to_tokens(int(i)) for i in ids]
    assert len(pieces_t) == len(ids)
    for j, i in enumerate(alignment.teacher_pos.tolist()):
        if i >= 0:
            assert student.decode(alignment.ids[: j + 1].tolist()) == teacher.decode(ids[: i + 1])


@pytest.mark.parametrize("seed", range(4))
def test_aligned_positions_predict_the_same_text_from_the_same_point(setting, seed):
    teacher = open_store(setting["store"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher.tokenizer_path)
    student = setting["tokenizer"]
    rng = np.random.default_rng(seed)
    docs = python_docs()
    text = docs[int(rng.integers(len(docs)))][:400] + " héllo wörld ✓ — ünïcödé"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = int(rng.integers(1, 8))
    ids = ids[cut:] + [tokenizer.eos_token_id] + ids[: int(rng.integers(5, 40))]  # an EOS inside, any cut
    alignment, = Aligner(tokenizer, student).align([np.array(ids)])
    _aligned_prefixes_agree(tokenizer, student, ids, alignment)
    aligned = alignment.teacher_pos >= 0
    assert 0.5 < aligned.mean() < 1.0  # most positions meet: a smaller vocabulary splits some teacher tokens
    eos = alignment.ids.tolist().index(student.eos_token_id)
    assert alignment.home[eos] == len(ids) - 1 - (len(ids) - 1 - ids.index(tokenizer.eos_token_id))
    # Every student token's first byte lies in its home teacher token, in order.
    assert (np.diff(alignment.home) >= 0).all()


def test_the_same_tokenizer_aligns_every_position_to_itself(setting):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(open_store(setting["store"]).tokenizer_path)
    rows = open_store(setting["store"]).read(0, 10)["input_ids"]
    for ids, alignment in zip(rows, Aligner(tokenizer, tokenizer).align(list(rows))):
        np.testing.assert_array_equal(alignment.ids, ids)  # byte pieces of one character included
        np.testing.assert_array_equal(alignment.teacher_pos, np.arange(len(ids)))
        np.testing.assert_array_equal(alignment.home, np.arange(len(ids)))


def test_a_sentencepiece_teacher_and_a_byte_level_student():
    from tokenizers import decoders, pre_tokenizers

    from conftest import fast_tokenizer, train_bpe

    teacher = metaspace_tokenizer()
    core = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), ["</s>"],
                     pre_tokenizers.ByteLevel.alphabet())
    student = fast_tokenizer(core, None, eos_token="</s>")
    ids = teacher("the the\nthe", add_special_tokens=False)["input_ids"] + [1]
    alignment, = Aligner(teacher, student).align([np.array(ids)])
    assert student.decode(alignment.ids.tolist()).startswith(" the the\nthe")  # ▁ is a space: the text has one
    assert alignment.ids[-1] == student.eos_token_id and alignment.teacher_pos[-1] == len(ids) - 1
    _aligned_prefixes_agree(teacher, student, ids, alignment)


# ---- the view ----------------------------------------------------------------------------------------

def test_a_view_records_what_the_student_learns_from(setting, tmp_path):
    store = open_store(setting["store"])
    view = build_view(store, setting["tokenizer"], tmp_path / "v", progress=False)
    counts = view.counts
    assert counts.sequences == len(store) == len(view)
    assert 0.5 < counts.aligned_share < 1 and 0.5 < counts.mapped_share < 1
    rows = view.rows(np.array([3, 0]))
    assert rows["ids"].shape == (2, view.max_length)
    for r, index in enumerate((3, 0)):
        teacher_ids = store.read(index, index + 1)["input_ids"][0]
        alignment, = Aligner(__import__("transformers").AutoTokenizer.from_pretrained(store.tokenizer_path),
                             setting["tokenizer"]).align([teacher_ids])
        n = rows["lengths"][r]
        np.testing.assert_array_equal(rows["ids"][r, :n], alignment.ids)
        assert (rows["teacher_pos"][r, n:] == -1).all()
    # The mapped share is the mass on mapped ids over the cached mass, at aligned positions (recomputed here).
    every = store.read(0, len(store))
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(store.tokenizer_path)
    alignments = Aligner(tokenizer, setting["tokenizer"]).align(list(every["input_ids"]))
    cached = mapped = 0.0
    for r, a in enumerate(alignments):
        for i in a.teacher_pos[:-1][a.teacher_pos[:-1] >= 0]:
            p = np.exp(every["target_logprobs"][r, i].astype(np.float64))
            cached += p.sum()
            mapped += (p * (view.student_of[every["target_ids"][r, i]] >= 0)).sum()
    assert counts.mapped_share == pytest.approx(mapped / cached, rel=1e-9)
    # info on a view
    out = CliRunner().invoke(main, ["info", str(tmp_path / "v")])
    assert out.exit_code == 0, out.output
    assert f"{counts.aligned_share:.1%} of the student's positions meet a teacher position" in out.output
    assert f"{counts.mapped_share:.1%} of the teacher's cached mass" in out.output
    as_json = CliRunner().invoke(main, ["info", str(tmp_path / "v"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.output)
    assert summary["counts"] == view.manifest["counts"]
    assert summary["summary"] == {"aligned_share": counts.aligned_share, "mapped_share": counts.mapped_share}


def test_a_damaged_or_foreign_view_is_refused(setting, tmp_path):
    store = open_store(setting["store"])
    path = tmp_path / "v"
    build_view(store, setting["tokenizer"], path, progress=False)
    with pytest.raises(SoftcacheError, match="already exists"):
        build_view(store, setting["tokenizer"], path, progress=False)
    with pytest.raises(SoftcacheError, match="built for another tokenizer"):
        View(path).check_tokenizer("0" * 64, "--student x", "--view")
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    with open(damaged / "rows.arrow", "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SoftcacheError, match="does not match its sha256"):
        View(damaged)
    with pytest.raises(SoftcacheError, match="is not a view"):
        View(tmp_path)
    manifest = json.loads((path / "view.json").read_text())
    manifest["store"]["content_sha256"] = "f" * 64
    (damaged / "view.json").write_text(json.dumps(manifest))
    with pytest.raises(SoftcacheError, match="was built from another store"):
        View(damaged, verify=False).check_store(store)
    manifest = json.loads((path / "view.json").read_text())
    manifest["student"]["size"] = store.k  # a student vocabulary no larger than the cached ids per position
    (damaged / "view.json").write_text(json.dumps(manifest))
    with pytest.raises(SoftcacheError, match="the store holds 8 ids per position and the student's tokenizer has 8"):
        View(damaged, verify=False).check_store(store)
    # Nothing half-built is left beside the view.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "v"]


@pytest.mark.parametrize("damage", [
    lambda m: m.pop("counts"),
    lambda m: m["counts"].update(aligned="many"),
    lambda m: m["counts"].update(cached_mass=float("nan")),
    lambda m: m["counts"].update(extra=1),
    lambda m: m.update(max_length=-1),
    lambda m: m.update(max_length=True),
    lambda m: m["student"].update(size=2.5),
    lambda m: m.update(sha256=["rows.arrow"]),
    lambda m: m["sha256"].pop("student_of.npy"),
    lambda m: m.pop("store"),
], ids=["no counts", "a count of text", "nan mass", "an unknown count", "negative length", "boolean length",
        "fractional size", "digests not a mapping", "a digest missing", "no store"])
def test_a_hand_edited_view_manifest_is_one_line(setting, tmp_path, damage):
    path = tmp_path / "v"
    build_view(open_store(setting["store"]), setting["tokenizer"], path, progress=False)
    manifest = json.loads((path / "view.json").read_text())
    damage(manifest)
    (path / "view.json").write_text(json.dumps(manifest))
    with pytest.raises(SoftcacheError, match=r"view.json is damaged \(\w+: .*\); delete the view and build it again$"):
        View(path, verify=False)


def test_damaged_view_files_read_without_checksums_are_one_line(setting, tmp_path):
    store = open_store(setting["store"])
    path = tmp_path / "v"
    build_view(store, setting["tokenizer"], path, progress=False)
    (tmp_path / "file").write_text("not a view")
    for odd in (tmp_path / "file", tmp_path):
        with pytest.raises(SoftcacheError, match="is not a view"):
            View(odd)
    shutil.copytree(path, tmp_path / "listed")
    (tmp_path / "listed" / "view.json").write_text("[1, 2]")
    with pytest.raises(SoftcacheError, match="is not a softcache-view of version 1"):
        View(tmp_path / "listed")
    data = (path / "rows.arrow").read_bytes()
    (path / "rows.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(SoftcacheError, match="does not match its sha256"):
        View(path)
    with pytest.raises(SoftcacheError, match=r"rows.arrow does not read \(.*\); the view is damaged"):
        View(path, verify=False).rows(np.array([0]))
    (path / "student_of.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(SoftcacheError, match=r"student_of.npy does not read"):
        View(path, verify=False).student_of


def test_the_view_command(setting, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["view", str(setting["store"]), "--tokenizer", str(setting["student"]), "--out",
                               str(tmp_path / "v"), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"view {tmp_path / 'v'}: ") and "aligned with the teacher's" in out.output
    inside = runner.invoke(main, ["view", str(setting["store"]), "--tokenizer", str(setting["student"]), "--out",
                                  str(setting["store"] / "views")])
    assert inside.exit_code == 1 and "is inside the store" in inside.output
    missing = runner.invoke(main, ["view", str(setting["store"]), "--tokenizer", str(tmp_path / "nothing"), "--out",
                                   str(tmp_path / "w")])
    assert missing.exit_code == 1 and "--tokenizer" in missing.output and len(missing.output.splitlines()) == 1
    assert not (tmp_path / "w").exists()


# ---- losses ------------------------------------------------------------------------------------------

def test_hybrid_uld_compares_the_unmatched_rest_only():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    unmatched = torch.tensor([[-math.inf, math.log(0.3), -math.inf, math.log(0.1)]], dtype=torch.float64)
    exclude = torch.tensor([[0, 2, -1, 0]])  # student ids 0 and 2 are the projection's
    q = torch.softmax(logits, -1)[0]
    rest = torch.stack([q[1], q[3], q[4]]).sort(descending=True).values
    want = abs(0.3 - rest[0]) + abs(0.1 - rest[1])  # two unmatched teacher entries: two compared, nothing beyond
    assert float(uld(logits, unmatched, exclude=exclude)[0]) == pytest.approx(float(want), rel=1e-12)


def test_the_cross_losses_add_up_as_documented():
    torch.manual_seed(0)
    n, vocab, k = 6, 20, 4
    logits = torch.randn(1, n, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(n, 30, dtype=torch.float64) * 2, -1)
    raw, ids = teacher.topk(k, -1)
    student_of = torch.where(torch.arange(30) % 3 == 0, -1, torch.arange(30) % vocab)
    from softcache.cross_losses import project_targets

    p_ids, p_lp, matched = project_targets(ids, raw, student_of, vocab)
    mask = torch.tensor([[True, True, False, True, True, True]])
    labels = torch.randint(0, vocab, (1, n))
    batch = {"target_ids": p_ids[None], "target_logprobs": p_lp[None], "mask": mask, "labels": labels,
             "teacher_logprobs": torch.where(student_of[ids] >= 0, -math.inf, raw)[None]}
    kd_p, ce = distillation_loss(logits, p_ids[None], p_lp[None], mask, labels, "fkl", "bucket")
    hybrid_kd, hybrid_ce = CrossTokenizerLoss("hybrid")(logits, batch)
    held = torch.where(p_lp > -math.inf, p_ids, -1)
    extra = uld(logits[0][mask[0]], batch["teacher_logprobs"][0][mask[0]], exclude=held[mask[0]]).sum()
    assert torch.allclose(hybrid_kd, kd_p + extra.float()) and torch.equal(hybrid_ce, ce)
    assert torch.equal(CrossTokenizerLoss("projection")(logits, batch)[0], kd_p)
    batch["teacher_logprobs"] = raw[None]
    uld_kd, _ = CrossTokenizerLoss("uld")(logits, batch)
    assert torch.allclose(uld_kd, uld(logits[0][mask[0]], raw[mask[0]]).sum().float())
    uld_kd.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2].abs().sum() == 0  # masked position: no gradient
    # In chunks of positions (recomputed in backward), the same values and gradients.
    batch["teacher_logprobs"] = torch.where(student_of[ids] >= 0, -math.inf, raw)[None]
    grads = []
    for chunk_tokens in (256, 2):
        logits.grad = None
        kd, _ = CrossTokenizerLoss("hybrid", chunk_tokens=chunk_tokens)(logits, batch)
        kd.backward()
        grads.append((kd.detach(), logits.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


# ---- the student job ---------------------------------------------------------------------------------

def test_with_the_teachers_tokenizer_the_cross_job_trains_exactly_as_the_plain_one(setting, tmp_path):
    plain = train(setting, tmp_path / "plain", student=str(setting["same"]), tokenizers="same", view=None)
    crossed = train(setting, tmp_path / "cross", student=str(setting["same"]), view=str(tmp_path / "same-view"),
                    cross_loss="projection")
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "cross")
    for x, y in zip(a, b):
        assert (x["loss"], x["kd"], x["ce"], x["grad_norm"]) == (y["loss"], y["kd"], y["ce"], y["grad_norm"])
    assert {k: v for k, v in a[-1]["eval"].items()} == {k: v for k, v in b[-1]["eval"].items()}
    assert plain.steps == crossed.steps == 6


@pytest.mark.parametrize("cross_loss", ["projection", "uld", "hybrid"])
def test_a_student_with_another_tokenizer_trains_and_saves_with_its_own(setting, tmp_path, cross_loss):
    result = train(setting, tmp_path / "run", cross_loss=cross_loss)
    records = metrics(tmp_path / "run")
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in records)
    assert records[-1]["eval"]["bits_per_byte"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = tmp_path / "run" / "final"
    assert AutoTokenizer.from_pretrained(final).get_vocab() == setting["tokenizer"].get_vocab()
    AutoModelForCausalLM.from_pretrained(final)
    assert result.steps == 6
    out = CliRunner().invoke(main, ["eval", "--model", str(final), "--store", str(setting["store"]), "--view",
                                    str(setting["root"] / "view")])
    assert out.exit_code == 0 and "bits_per_byte" in out.output, out.output


def test_a_cross_run_resumes_exactly(setting, tmp_path, monkeypatch):
    train(setting, tmp_path / "reference", steps=5)
    interrupted(monkeypatch, torch.optim.AdamW, "step", 4, lambda: train(setting, tmp_path / "killed", steps=5))
    train(setting, tmp_path / "killed", steps=5, resume=True)
    ours, theirs = metrics(tmp_path / "killed"), metrics(tmp_path / "reference")
    assert [(m["loss"], m["kd"], m["ce"]) for m in ours] == [(m["loss"], m["kd"], m["ce"]) for m in theirs]


@pytest.mark.parametrize("overrides, message", [
    (dict(view=None), "--tokenizers cross needs --view DIR"),
    (dict(tokenizers="same"), "--view is for a student with another tokenizer; add --tokenizers cross"),
    (dict(tail="renorm"), "--tail is for a student with the teacher's tokenizer"),
    (dict(loss="rkl"), "--loss is for a student with the teacher's tokenizer"),
    (dict(eval_store="x", eval_fraction=0.0), "--eval-store is not read through a view yet"),
    (dict(fused_linear="on"), "--fused-linear on is for a student with the teacher's tokenizer"),
])
def test_cross_settings_that_do_not_go_together(setting, tmp_path, overrides, message):
    with pytest.raises(SoftcacheError, match=message):
        train(setting, tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()


def test_cross_students_that_cannot_train_are_refused(setting, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(setting["student"] / "config.json", bare / "config.json")
    with pytest.raises(SoftcacheError, match="has no tokenizer files"):
        train(setting, tmp_path / "run", student=str(bare))
    short = tmp_path / "short"
    shutil.copytree(setting["student"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    with pytest.raises(SoftcacheError, match="admits 16 positions but the view .*'s longest sequence has"):
        train(setting, tmp_path / "run", student=str(short))
    with pytest.raises(SoftcacheError, match="built for another tokenizer"):  # the view is the 300-token one's
        train(setting, tmp_path / "run", student=str(setting["same"]))
    assert not (tmp_path / "run").exists()


def test_the_replaced_flag_says_what_replaced_it(setting, tmp_path):
    out = CliRunner().invoke(main, ["train", "--allow-tokenizer-mismatch"])
    assert out.exit_code == 2 and "--allow-tokenizer-mismatch was replaced by --tokenizers trust-ids" in out.output
    config = tmp_path / "c.yaml"
    config.write_text("allow_tokenizer_mismatch: true\n")
    out = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert out.exit_code != 0 and "'allow_tokenizer_mismatch' was replaced by --tokenizers trust-ids" in out.output


def test_a_chat_store_through_a_view_teaches_the_assistants_text_only(setting, tiny_teacher, tmp_path):
    """Documents packing and a teaching mask carried over: CE and KD only where the teacher's store teaches,
    each student token in its teacher token's document."""
    from softcache.cross_data import ViewDataset

    from test_chat_jobs import cache_args

    data, template = _chat(tmp_path)
    runner = CliRunner()
    cached = runner.invoke(main, cache_args(tiny_teacher, data, template, tmp_path / "store"))
    assert cached.exit_code == 0, cached.output
    store = open_store(tmp_path / "store")
    assert store.encoding.masked and store.encoding.documents
    build_view(store, setting["tokenizer"], tmp_path / "view", progress=False)
    dataset = ViewDataset(str(tmp_path / "store"), str(tmp_path / "view"), 4, "hybrid", shuffle=False, epochs=1,
                          world_size=1, rank=0)
    view = View(tmp_path / "view")
    for batch in dataset:
        rows = np.arange(int(batch["step"]) * 4, min(int(batch["step"]) * 4 + 4, len(store)))
        teacher = store.read_rows(rows)
        student = view.rows(rows)
        for r in range(len(rows)):
            n = student["lengths"][r]
            home = student["home"][r, :n]
            labelled = batch["labels"][r, : n - 1] >= 0
            np.testing.assert_array_equal(labelled.numpy(), teacher["teach"][r][np.maximum(home[1:] - 1, 0)])
            assert 0 < labelled.sum() < n - 1  # the assistant's text, not the user's
            np.testing.assert_array_equal(batch["segments"][r, :n].numpy(), teacher["segments"][r][home])
            kd = batch["mask"][r, :n].numpy()
            assert teacher["teach"][r][student["teacher_pos"][r, :n][kd]].all()
    out = runner.invoke(main, ["train", "--store", str(tmp_path / "store"), "--student", str(setting["student"]),
                               "--tokenizers", "cross", "--view", str(tmp_path / "view"), "--out", str(tmp_path / "run"),
                               "--steps", "2", "--batch-size", "2", "--num-workers", "0", "--no-progress"])
    assert out.exit_code == 0, out.output


def _chat(root):
    """Conversations about the docs' topics (as test_chat_jobs's fixture) and its compact template."""
    from pydoc_data.topics import topics

    from conftest import COMPACT_TEMPLATE

    rows = []
    for number, name in enumerate(sorted(topics)[:24]):
        text = " ".join(topics[name].split())
        rows.append({"messages": [{"role": "user", "content": f"What is {name}?"},
                                  {"role": "assistant", "content": text[:90]}]})
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    template = root / "chat.jinja"
    template.write_text(COMPACT_TEMPLATE)
    return str(data), str(template)


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_two_ranks_build_the_view_once_and_train_as_one(setting, tmp_path):
    """Rank 0 builds the missing view while rank 1 waits; the 2-rank run gives the 1-rank losses."""
    from test_distributed import torchrun

    common = ["train", "--store", setting["store"], "--student", setting["student"], "--tokenizers", "cross",
              "--steps", 3, "--lr", "5e-3", "--checkpoint-every", 3, "--num-workers", 0, "--no-progress"]
    one = CliRunner().invoke(main, [str(a) for a in [*common, "--batch-size", 4, "--out", tmp_path / "one",
                                                     "--view", tmp_path / "view-one"]])
    assert one.exit_code == 0, one.output
    two = torchrun(*common, "--batch-size", 2, "--out", tmp_path / "two", "--view", tmp_path / "view-two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert (json.loads((tmp_path / "view-one" / "view.json").read_text())["sha256"]
            == json.loads((tmp_path / "view-two" / "view.json").read_text())["sha256"])
    for x, y in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert x["tokens"] == y["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["kd"] == pytest.approx(x["kd"], rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "view-one", "view-two"]


def test_two_jobs_building_one_view_at_once_end_with_one_whole_view(setting, tmp_path, monkeypatch):
    """The other job renames its view into place first: this one's rename fails, and it takes that view."""
    import os

    import softcache.view as view_module

    store = open_store(setting["store"])
    other = tmp_path / "other"
    build_view(store, setting["tokenizer"], other, progress=False)
    rename = os.rename

    def beaten(source, target):
        shutil.copytree(other, target)  # the other job's view lands first
        rename(source, target)

    monkeypatch.setattr(view_module.os, "rename", beaten)
    view = build_view(store, setting["tokenizer"], tmp_path / "v", progress=False)
    assert view.manifest["sha256"] == View(other).manifest["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "v"]  # no partial directory left


def test_a_view_row_pointing_outside_its_sequence_is_one_line():
    from softcache.cross_data import student_batch

    teacher = {"mask": torch.ones(1, 4, dtype=torch.bool), "target_ids": torch.zeros(1, 4, 2, dtype=torch.long),
               "target_logprobs": torch.zeros(1, 4, 2)}
    for field, value in (("home", 4), ("teacher_pos", 7), ("home", -1)):
        student = {"ids": np.zeros((1, 3), dtype=np.int64), "home": np.zeros((1, 3), dtype=np.int64),
                   "teacher_pos": np.full((1, 3), -1, dtype=np.int64), "lengths": np.array([3])}
        student[field][0, 1] = value
        with pytest.raises(SoftcacheError, match="a view row points outside its store sequence"):
            student_batch(teacher, student, np.array([True]), torch.arange(4), 10, "projection")
