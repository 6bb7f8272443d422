"""The student job end to end: tiny store, tiny student, a few CPU steps, resume, refusals."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from softcache import SoftcacheError, StoreError
from softcache.cache_job import run_cache
from softcache.config import CacheConfig, TrainConfig
from softcache.train_job import run_train

from softcache.store.manifest import RECORD_SEAL, sealed

from conftest import TINY_VOCAB, edit_manifest, make_teacher
from conftest import interrupted as interrupted_run


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, corpus_file):
    """A store written by a teacher whose files are deleted before any student trains."""
    root = tmp_path_factory.mktemp("train")
    teacher = make_teacher(root / "teacher", seed=1)
    run_cache(CacheConfig(teacher=str(teacher), data=str(corpus_file), out=str(root / "store"), seq_len=32,
                          max_sequences=40, targets="topk", k=8, batch_size=8, shard_size=8, progress=False))
    shutil.rmtree(teacher)
    return root / "store"


def student_config(path, vocab=TINY_VOCAB):
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": vocab, "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "max_position_embeddings": 64}))
    return path


@pytest.fixture
def train_config(trained_store, tmp_path):
    student = student_config(tmp_path / "student.json")

    def build(**overrides) -> TrainConfig:
        options = dict(store=str(trained_store), student=str(student), out=str(tmp_path / "run"), steps=6,
                       batch_size=4, lr=5e-3, eval_fraction=0.2, checkpoint_every=2, num_workers=0, progress=False)
        options.update(overrides)
        return TrainConfig(**options)

    return build


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_saves_a_loadable_student_without_the_teacher(train_config, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = train_config(steps=12, eval_every=6)
    result = run_train(config)
    run = tmp_path / "run"
    lines = metrics(run)
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert "eval" in lines[5] and "eval" in lines[11] and "eval" not in lines[0]
    evaluation = lines[-1]["eval"]
    assert set(evaluation) == {"ce", "perplexity", "kl", "top1_agreement", "ece", "bits_per_byte", "tokens"}
    assert 0 <= evaluation["ece"] <= 1
    assert evaluation["tokens"] == 8 * 31  # 20% of 40 sequences held out, 31 labelled positions each
    # Bits per byte: the summed CE in bits over the bytes of the tokens predicted (each sequence's but its first).
    from softcache.store import open_store
    from softcache.vocab_map import token_bytes

    store = open_store(config.store)
    pieces = token_bytes(AutoTokenizer.from_pretrained(store.tokenizer_path))
    predicted = sum(len(pieces[i] or b"") for row in store.read(32, 40)["input_ids"] for i in row[1:])
    assert evaluation["bits_per_byte"] == pytest.approx(evaluation["ce"] * evaluation["tokens"] / math.log(2) / predicted)
    assert lines[-1]["kd"] < lines[0]["kd"] and lines[-1]["ce"] < lines[0]["ce"]
    assert result.final_eval == evaluation and "held-out CE" in result.summary()
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size == TINY_VOCAB and len(tokenizer) == TINY_VOCAB
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["alpha"] == 0.5 and saved["store"]["content_sha256"]


@pytest.mark.parametrize("targets", ["topp", "sampled"])
def test_every_target_kind_trains_end_to_end(tmp_path_factory, corpus_file, tmp_path, targets):
    """No target settings are copied by hand: the student reads the kind and its loss from the store."""
    root = tmp_path_factory.mktemp(targets)
    teacher = make_teacher(root / "teacher", seed=1)
    run_cache(CacheConfig(teacher=str(teacher), data=str(corpus_file), out=str(root / "store"), seq_len=32,
                          max_sequences=24, k=8, targets=targets, top_p=0.8, samples=12, batch_size=8,
                          shard_size=8, progress=False))
    config = TrainConfig(store=str(root / "store"), student=str(student_config(tmp_path / "student.json")),
                         out=str(tmp_path / "run"), steps=16, batch_size=4, lr=5e-3, eval_fraction=0.2,
                         num_workers=0, progress=False)
    result = run_train(config)
    kd = torch.tensor([m["kd"] for m in metrics(tmp_path / "run")])
    assert torch.isfinite(kd).all()
    assert kd[-4:].mean() < kd[:4].mean(), kd
    assert result.final_eval["kl"] >= 0 and 0 <= result.final_eval["top1_agreement"] <= 1


def _weights(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def test_resume_after_a_kill_gives_the_uninterrupted_losses(train_config, tmp_path, monkeypatch):
    reference = train_config(out=str(tmp_path / "reference"), steps=7, checkpoint_every=3, grad_accum=2)
    run_train(reference)

    interrupted = train_config(out=str(tmp_path / "interrupted"), steps=7, checkpoint_every=3, grad_accum=2)
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 5, lambda: run_train(interrupted))  # during step 5
    assert [m["step"] for m in metrics(tmp_path / "interrupted")] == [1, 2, 3, 4]

    with pytest.raises(SoftcacheError, match="already holds a training run; pass --resume"):
        run_train(interrupted)
    interrupted.resume = True
    result = run_train(interrupted)
    assert result.steps == 4  # steps 4..7 after the step-3 checkpoint
    ours, theirs = metrics(tmp_path / "interrupted"), metrics(tmp_path / "reference")
    assert [m["step"] for m in ours] == list(range(1, 8))
    for a, b in zip(ours, theirs):
        assert (a["loss"], a["kd"], a["ce"], a["lr"]) == (b["loss"], b["kd"], b["ce"], b["lr"])
    for name, tensor in _weights(tmp_path / "reference").items():
        assert torch.equal(tensor, _weights(tmp_path / "interrupted")[name]), name


def test_grad_accumulation_matches_one_big_batch(train_config, tmp_path):
    run_train(train_config(out=str(tmp_path / "big"), steps=2, batch_size=8, grad_accum=1, eval_fraction=0.0))
    run_train(train_config(out=str(tmp_path / "small"), steps=2, batch_size=2, grad_accum=4, eval_fraction=0.0))
    big, small = metrics(tmp_path / "big"), metrics(tmp_path / "small")
    for a, b in zip(big, small):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_losses_and_tails_all_train(train_config, tmp_path):
    for loss, tail in [("rkl", "bucket"), ("jsd", "bucket"), ("tvd", "bucket"), ("fkl", "renorm")]:
        out = tmp_path / f"{loss}-{tail}"
        run_train(train_config(out=str(out), steps=2, loss=loss, tail=tail, temperature=2.0))
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(out))


def test_student_must_hold_the_store_ids(train_config, tmp_path):
    small = student_config(tmp_path / "small.json", vocab=200)
    with pytest.raises(SoftcacheError, match="has 200 output ids but the store's teacher uses 384"):
        run_train(train_config(student=str(small)))
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind
    with pytest.raises(SoftcacheError, match="has 200 output ids"):
        run_train(train_config(student=str(small), out=str(tmp_path / "r2"), tokenizers="trust-ids"))


def test_student_with_another_tokenizer_is_refused_unless_allowed(train_config, tmp_path):
    other = make_teacher(tmp_path / "other", vocab_size=TINY_VOCAB + 16)  # a model dir with its own tokenizer
    with pytest.raises(SoftcacheError, match="different tokenizer from the store's teacher"):
        run_train(train_config(student=str(other)))
    run_train(train_config(student=str(other), out=str(tmp_path / "allowed"), steps=1,
                           tokenizers="trust-ids"))


def test_incomplete_store_and_changed_resume_are_refused(train_config, trained_store, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(trained_store, partial)
    manifest = edit_manifest(partial, lambda manifest: {**manifest, "complete": False})
    with pytest.raises(StoreError, match="incomplete.*--allow-incomplete"):
        run_train(train_config(store=str(partial)))
    # On purpose: the finished shards (here the progress records of the shards in the table).
    (partial / "progress").mkdir()
    for shard in manifest["shards"][:3]:
        (partial / "progress" / f"shard-{shard['index']:05d}.json").write_text(json.dumps(sealed(shard, RECORD_SEAL)))
    run_train(train_config(store=str(partial), out=str(tmp_path / "partial-run"), allow_incomplete=True, steps=2,
                           eval_fraction=0.0))
    assert len(metrics(tmp_path / "partial-run")) == 2
    run_train(train_config(steps=2))
    with pytest.raises(SoftcacheError, match=r"--resume with changed settings \(lr: run has 0.005, now 0.01\)"):
        run_train(train_config(steps=2, lr=1e-2, resume=True))


def test_a_run_from_before_a_setting_existed_resumes_at_its_default(train_config, tmp_path):
    """A run directory written before --student-dtype and the LoRA flags existed resumes: a missing
    setting is its default, which is what that run did."""
    run_train(train_config(steps=2))
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("student_dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"):
        del record["config"][key]
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    assert run_train(train_config(steps=2, resume=True)).steps == 0
    with pytest.raises(SoftcacheError, match=r"changed settings \(student_dtype: run has 'float32', now 'bfloat16'\)"):
        run_train(train_config(steps=2, resume=True, student_dtype="bfloat16"))


def test_damaged_checkpoint_is_one_clear_error(train_config, tmp_path):
    run_train(train_config(steps=2, checkpoint_every=1))
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(SoftcacheError, match="is damaged"):
        run_train(train_config(steps=2, checkpoint_every=1, resume=True))


def test_cli_train_then_eval(trained_store, tmp_path):
    from click.testing import CliRunner

    from softcache.cli import main

    student = student_config(tmp_path / "s.json")
    run = CliRunner().invoke(main, ["train", "--store", str(trained_store), "--student", str(student), "--out",
                                    str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--num-workers", "0",
                                    "--eval-fraction", "0.1", "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "trained 3 steps" in run.output and "held-out CE" in run.output
    evaluated = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run" / "final"), "--store",
                                          str(trained_store), "--max-sequences", "8", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    numbers = json.loads(evaluated.output)
    assert numbers["tokens"] == 8 * 31 and 0 <= numbers["top1_agreement"] <= 1
    human = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run" / "final"), "--store",
                                      str(trained_store), "--max-sequences", "4"])
    assert human.exit_code == 0 and "perplexity" in human.output


@pytest.mark.parametrize("flags,message", [
    (["--alpha", "2"], "--alpha must be between 0 and 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "2", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--eval-fraction", "1.5"], "--eval-fraction must be in [0, 1)"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--temperature", "-1"], "--temperature must be greater than 0"),
])
def test_cli_train_bad_flags(trained_store, tmp_path, flags, message):
    from click.testing import CliRunner

    from softcache.cli import main

    student = student_config(tmp_path / "s.json")
    result = CliRunner().invoke(main, ["train", "--store", str(trained_store), "--student", str(student), "--out",
                                       str(tmp_path / "run"), "--no-progress", *flags])
    assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output
    assert not (tmp_path / "run").exists()


def test_epochs_and_a_separate_eval_store(train_config, trained_store, tmp_path):
    held_out = tmp_path / "held-out"
    shutil.copytree(trained_store, held_out)
    result = run_train(train_config(steps=None, epochs=2, batch_size=8, grad_accum=2, eval_fraction=0.0,
                                    eval_store=str(held_out)))
    assert result.steps == 5  # 2 epochs x 5 batches of 8 (of 40 sequences) / 2 micro-batches per step
    lines = metrics(tmp_path / "run")
    assert [m["epoch"] for m in lines] == [0, 0, 1, 1, 1]  # a step's epoch is its last micro-batch's
    assert lines[-1]["eval"]["tokens"] == 40 * 31


def test_calibration_bins_give_the_hand_computed_ece():
    from softcache.evaluate import calibration_bins

    bins = calibration_bins(torch.tensor([0.95, 0.95, 0.05]), torch.tensor([True, False, False]))
    assert bins[0, 14] == 2 and bins[0, 0] == 1
    ece = float((bins[1] - bins[2]).abs().sum() / bins[0].sum())
    assert ece == pytest.approx((abs(1.9 - 1) + 0.05) / 3)


def test_fused_linear_loss_trains_like_the_logits_loss(train_config, tmp_path):
    run_train(train_config(out=str(tmp_path / "fused"), steps=4, fused_linear="on"))
    run_train(train_config(out=str(tmp_path / "logits"), steps=4, fused_linear="off"))
    for a, b in zip(metrics(tmp_path / "fused"), metrics(tmp_path / "logits")):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def test_only_plain_linear_heads_are_fused():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from softcache.student import fusable

    ids = torch.randint(0, 100, (2, 12))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert fusable(llama, ids)
    capped = Gemma2ForCausalLM(Gemma2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                            final_logit_softcapping=0.5))
    assert not fusable(capped, ids)  # soft-capped logits are not hidden @ W.T


def test_fused_linear_auto_fuses_where_memory_is_the_constraint():
    from softcache.config import FUSE_ABOVE_BYTES
    from softcache.train_job import fuse_wanted

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fuse_wanted("auto", cpu, FUSE_ABOVE_BYTES)  # small logits on CPU: the faster unfused loss
    assert fuse_wanted("auto", cpu, FUSE_ABOVE_BYTES + 1) and fuse_wanted("auto", cuda, 1)
    assert fuse_wanted("on", cpu, 1) and not fuse_wanted("off", cuda, 10 * FUSE_ABOVE_BYTES)


def test_a_run_directory_in_use_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(train_config, tmp_path):
    import socket
    import subprocess
    import sys

    from softcache.train_job import RUN_LOCK

    run_train(train_config(steps=2, checkpoint_every=1))
    lock = tmp_path / "run" / RUN_LOCK
    assert not lock.exists()  # released at the end
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "since": "then"}))
        with pytest.raises(SoftcacheError, match=rf"--out .* is being trained into by another softcache train run "
                                                 rf"\(this host, pid {other.pid}, since then\)"):
            run_train(train_config(steps=2, checkpoint_every=1, resume=True))
    finally:
        other.kill()
        other.wait()
    result = run_train(train_config(steps=2, checkpoint_every=1, resume=True))  # its holder is dead: taken over
    assert result.steps == 0 and not lock.exists()


def test_a_student_that_sees_later_tokens_is_refused_naming_its_type(train_config, tmp_path):
    bert = {"model_type": "bert", "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}
    (tmp_path / "bert.json").write_text(json.dumps(bert))
    with pytest.raises(SoftcacheError, match=r"\(bert, BertLMHeadModel\) is not a causal language model"):
        run_train(train_config(student=str(tmp_path / "bert.json"), out=str(tmp_path / "bert-run")))
    assert not (tmp_path / "bert-run").exists()  # refused before anything was written
    (tmp_path / "bert-decoder.json").write_text(json.dumps({**bert, "is_decoder": True}))
    assert run_train(train_config(student=str(tmp_path / "bert-decoder.json"), out=str(tmp_path / "ok"), steps=1)).steps == 1


def test_a_non_finite_loss_stops_the_run_naming_the_step_before_any_checkpoint(train_config, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = json.loads(student_config(tmp_path / "s.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 0] = float("nan")  # one poisoned weight
    model.save_pretrained(tmp_path / "poisoned")
    with pytest.raises(SoftcacheError, match=r"^step 1: the loss or the gradient norm is not finite"):
        run_train(train_config(student=str(tmp_path / "poisoned"), checkpoint_every=1))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()


def test_a_damaged_store_tokenizer_is_refused_before_training(train_config, trained_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(trained_store, copy)
    (copy / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(SoftcacheError, match=r"the store.s tokenizer file tokenizer/tokenizer.json has 2 bytes"):
        run_train(train_config(store=str(copy)))
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(SoftcacheError, match=r"tokenizer/tokenizer.json is missing"):
        run_train(train_config(store=str(copy)))
    assert not (tmp_path / "run").exists()


def test_a_final_model_that_does_not_load_back_is_not_reported_as_saved(train_config, tmp_path, monkeypatch):
    import transformers

    original = transformers.PreTrainedModel.save_pretrained

    def broken_save(model, directory, **kwargs):  # a faulty disk: the config comes back unreadable
        original(model, directory, **kwargs)
        (Path(directory) / "config.json").write_text("{not json")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(SoftcacheError, match="does not load back"):
        run_train(train_config(steps=2))
    assert not (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "checkpoints").is_dir()


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_damaged_one_refused(train_config, tmp_path, monkeypatch):
    config = train_config(steps=3, checkpoint_every=2)
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 3, lambda: run_train(config))  # during step 3
    log = tmp_path / "run" / "metrics.jsonl"
    with open(log, "ab") as handle:  # a crash in the middle of writing step 3's line
        handle.write(b'{"step": 3, "loss": 1.')
    config.resume = True
    assert run_train(config).steps == 1
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]

    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(SoftcacheError, match=r"metrics.jsonl line 2 is not a metrics record"):
        run_train(config)


def _disk_full(after_bytes: int):
    """A write that fills the disk: the first ``after_bytes`` bytes go through, then ENOSPC."""
    import errno

    written = {"n": 0}

    def write(handle_write, data):
        if written["n"] + len(data) > after_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        written["n"] += len(data)
        return handle_write(data)

    return write


def test_a_full_disk_while_checkpointing_is_one_error_keeping_the_older_checkpoint(train_config, tmp_path, monkeypatch):
    import contextlib

    from softcache import checkpoint

    original, calls = checkpoint.atomic_file, {"n": 0}

    @contextlib.contextmanager
    def filling(path, mode="wb"):  # the second checkpoint meets a full disk halfway through
        calls["n"] += 1
        with original(path, mode) as handle:
            if calls["n"] == 2:
                write, full = handle.write, _disk_full(1000)
                handle.write = lambda data: full(write, data)
            yield handle

    monkeypatch.setattr(checkpoint, "atomic_file", filling)
    config = train_config(steps=3, checkpoint_every=1)
    with pytest.raises(SoftcacheError, match=r"could not write the checkpoint of step 2 to .*checkpoints \(No space "
                                             r"left on device\); the older checkpoints are kept"):
        run_train(config)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000001.pt"]  # no temporary left
    assert checkpoint.load(run / "checkpoints" / "step-000000001.pt")["step"] == 1
    assert not (run / "final").exists()
    monkeypatch.setattr(checkpoint, "atomic_file", original)
    config.resume = True
    assert run_train(config).steps == 2


@pytest.mark.parametrize("presses", [1, 2])
def test_a_ctrl_c_while_a_checkpoint_is_written_says_one_line(train_config, tmp_path, monkeypatch, presses):
    """SIGINT halfway through torch.save surfaces as torch's RuntimeError about stream positions (a traceback,
    not the one line). A first Ctrl-C lets the checkpoint finish, then the run stops naming it; a second one
    stops the write at once, and the run names the checkpoint before (here none)."""
    import os
    import signal

    from softcache import checkpoint
    from softcache.errors import Interrupted

    original, calls = checkpoint._Writer.write, {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if 3 <= calls["n"] < 3 + presses:  # inside the first checkpoint's zip records
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, data)

    monkeypatch.setattr(checkpoint._Writer, "write", write)
    expected = ("rerun with --resume to continue from the checkpoint of step 2" if presses == 1
                else "before the first checkpoint; rerun with --resume to start again from step 0")
    # Ctrl-C handled as in a foreground job, whatever this process inherited (a shell's background job ignores it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted, match=rf"^interrupted at step 2 of 6[;,] {re.escape(expected)}$"):
            run_train(train_config())
    finally:
        signal.signal(signal.SIGINT, previous)
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == (["step-000000002.pt"] if presses == 1 else [])
    if presses == 1:
        assert checkpoint.load(run / "checkpoints" / "step-000000002.pt")["step"] == 2


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])  # safetensors' writer wraps the OSError
def test_a_full_disk_while_saving_the_model_is_one_error_and_no_final(train_config, tmp_path, monkeypatch, error):
    import errno

    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):  # half a file, then the disk is full
        Path(filename).write_bytes(b"\0" * 100)
        if error == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    config = train_config(steps=2, checkpoint_every=1)
    with pytest.raises(SoftcacheError, match=r"could not save the student to .*final \(.*No space left on device.*\); "
                                             r"the checkpoints are kept"):
        run_train(config)
    run = tmp_path / "run"
    assert not (run / "final").exists() and not (run / "final.tmp").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000001.pt", "step-000000002.pt"]
    monkeypatch.undo()
    config.resume = True
    assert run_train(config).steps == 0 and (run / "final" / "model.safetensors").is_file()


def test_a_full_disk_while_logging_metrics_is_one_error(train_config, tmp_path, monkeypatch):
    import errno

    from softcache import train_job

    def full(path, mode="r", *args, **kwargs):
        if Path(path).name == train_job.METRICS and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(train_job, "open", full, raising=False)
    with pytest.raises(SoftcacheError, match=r"could not append to .*metrics.jsonl \(No space left on device\)"):
        run_train(train_config(steps=2))


def test_an_interrupted_run_with_workers_says_one_line_and_exits_130(trained_store, tmp_path):
    """Ctrl-C reaches the whole process group: the DataLoader workers leave it to the main process, which
    stops between batches, says where, and leaves no process behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "softcache", "train", "--store", str(trained_store), "--student",
               str(student_config(tmp_path / "student.json")), "--out", str(tmp_path / "run"), "--steps", "10000",
               "--batch-size", "4", "--checkpoint-every", "2", "--num-workers", "2", "--no-progress"]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def as_from_a_terminal():
        """SIGINT delivered and handled as in a shell's foreground job, whatever the test process inherited or
        left behind (a signal mask blocking SIGINT, or SIGINT ignored, passes to the child through exec)."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, preexec_fn=as_from_a_terminal)
    log = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None and (
                not log.exists() or log.read_text().count("\n") < 3):
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = process.communicate(timeout=180)  # a loaded machine starts the workers slowly
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):  # no worker outlives the run
            os.killpg(process.pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert out == "" and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: interrupted at step [\d,]+ of 10,000; rerun with --resume to "
                                            r"continue from the checkpoint of step \d+", lines[0]), err
