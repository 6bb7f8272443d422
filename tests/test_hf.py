"""softcache.hf: the Trainer path gives softcache train's losses, normalises accumulation by the step's counts,
resumes exactly, handles packed chat stores, and refuses what softcache train refuses; the README's example runs."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softcache import SoftcacheError, StoreError
from softcache.cache_job import TeacherJob, run_cache
from softcache.config import CacheConfig, TrainConfig
from softcache.student import build_student
from softcache.train_job import run_train

from conftest import TINY_VOCAB
from test_chat_store import documents, pack_by_hand

pytest.importorskip("transformers")
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from softcache.hf import DistillationTrainer, StoreBatches, StoreSequences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _cache(tiny_teacher, corpus_file, out: Path, corpus=None, **overrides) -> str:
    options = dict(teacher=str(tiny_teacher), data=str(corpus_file), out=str(out), seq_len=32, max_sequences=24,
                   targets="topk", k=8, batch_size=4, shard_size=5, progress=False)
    options.update(overrides)
    config = CacheConfig(**options)
    TeacherJob(config, corpus=corpus).run() if corpus is not None else run_cache(config)
    return str(out)


@pytest.fixture(scope="module")
def stores(tiny_teacher, corpus_file, tmp_path_factory) -> dict[str, str]:
    """A text store (24 sequences in shards of 5) and a packed chat store (documents, teaching spans)."""
    root = tmp_path_factory.mktemp("hf")
    return {"text": _cache(tiny_teacher, corpus_file, root / "text"),
            "chat": _cache(tiny_teacher, corpus_file, root / "chat", corpus=pack_by_hand(documents(seed=3, count=40)),
                           max_sequences=None)}


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": TINY_VOCAB, "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "max_position_embeddings": 64}))
    return str(path)


def hf_args(out: Path, **overrides) -> TrainingArguments:
    """The Trainer's settings that match softcache train's (constant lr, AdamW betas 0.9/0.95, clip 1, no decay)."""
    options = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-3, lr_scheduler_type="constant",
                   weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, max_steps=8, logging_steps=1,
                   save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    options.update(overrides)
    return TrainingArguments(**options)


def softcache_config(store: str, student: str, out: Path, **overrides) -> TrainConfig:
    options = dict(store=store, student=student, out=str(out), steps=8, batch_size=4, lr=5e-3, warmup_steps=0,
                   min_lr_ratio=1.0, weight_decay=0.0, clip_grad=1.0, num_workers=0, fused_linear="off", device="cpu",
                   checkpoint_every=1000, progress=False)
    options.update(overrides)
    return TrainConfig(**options)


def train(store: str, student: str, args: TrainingArguments, **options) -> DistillationTrainer:
    trainer = DistillationTrainer(build_student(student, seed=0), args, train_dataset=StoreSequences(store), **options)
    trainer.train()
    return trainer


def logged(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("kind,accum,fused,workers", [("text", 2, "off", 2), ("text", 1, "on", 0),
                                                      ("chat", 1, "off", 0), ("chat", 2, "on", 0)])
def test_trainer_gives_softcache_trains_losses(stores, student, tmp_path, kind, accum, fused, workers):
    """Per step over 8 steps (three epochs of the text store): loss, KD, CE, gradient norm and the final weights. The
    Trainer's default remove_unused_columns=True is on: the targets still reach the loss. DataLoader workers read
    the same batches."""
    store = stores[kind]
    run_train(softcache_config(store, student, tmp_path / "cli", grad_accum=accum, fused_linear=fused))
    reference = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    args = hf_args(tmp_path / "hf", gradient_accumulation_steps=accum, dataloader_num_workers=workers)
    assert args.remove_unused_columns
    trainer = train(store, student, args, fused_linear=fused)
    assert trainer.fused == (fused == "on")
    ours = logged(trainer)
    assert [entry["step"] for entry in ours] == [record["step"] for record in reference] == list(range(1, 9))
    for entry, record in zip(ours, reference):
        for name, theirs in (("loss", "loss"), ("kd", "kd"), ("ce", "ce"), ("grad_norm", "grad_norm")):
            assert entry[name] == pytest.approx(record[theirs], rel=1e-5), (entry["step"], name)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "cli" / "final").state_dict()
    for name, tensor in weights(trainer.model).items():
        torch.testing.assert_close(tensor, saved[name], rtol=1e-4, atol=1e-6)


class Gradients(TrainerCallback):
    """Keeps each step's gradients as the optimiser gets them (after clipping)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: p.grad.clone() for name, p in model.named_parameters()})


def test_accumulation_is_normalised_by_the_steps_counts(stores, student, tmp_path):
    """On the chat store, whose rows teach different numbers of positions: 2 accumulated micro-batches of 2 give the
    losses and gradient norms of 1 micro-batch of 4 for 4 steps, and the first step's gradients."""
    store = stores["chat"]
    sequences = StoreSequences(store)
    first = next(iter(StoreBatches(sequences, 4, seed=0)))
    halves = [int(sequences.__getitems__(rows)["mask"].sum()) for rows in (first[:2], first[2:])]
    assert halves[0] != halves[1]  # the two micro-batches' counts differ: a per-micro-batch mean would not agree
    grads = {"big": Gradients(), "small": Gradients()}
    big = train(store, student, hf_args(tmp_path / "big", per_device_train_batch_size=4, max_steps=4),
                callbacks=[grads["big"]])
    small = train(store, student, hf_args(tmp_path / "small", per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=4), callbacks=[grads["small"]])
    for a, b in zip(logged(big), logged(small), strict=True):
        for name in ("loss", "kd", "ce", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-5), (a["step"], name)
    for name, grad in grads["big"].steps[0].items():  # the same weights: the same gradient, up to float
        torch.testing.assert_close(grad, grads["small"].steps[0][name], rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


class StopAt(TrainerCallback):
    """Stops training after step ``step``, as a killed run would stop (without a checkpoint there)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def test_resume_from_checkpoint_continues_as_if_never_stopped(stores, student, tmp_path, monkeypatch):
    """10 steps of 6 per epoch with a checkpoint every 4: stopped after step 9 and resumed from checkpoint-8 (in the
    second epoch), the run ends with the uninterrupted run's losses and weights, reading only the batches it trains."""
    store = stores["text"]
    options = dict(max_steps=10, save_strategy="steps", save_steps=4)
    reference = train(store, student, hf_args(tmp_path / "reference", **options))
    stopped = DistillationTrainer(build_student(student, seed=0), hf_args(tmp_path / "run", **options),
                                  train_dataset=StoreSequences(store), callbacks=[StopAt(9)])
    stopped.train()
    assert stopped.state.global_step == 9
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]

    reads = []
    original = StoreSequences.__getitems__
    monkeypatch.setattr(StoreSequences, "__getitems__", lambda self, rows: reads.append(rows) or original(self, rows))
    resumed = DistillationTrainer(build_student(student, seed=1), hf_args(tmp_path / "run", **options),
                                  train_dataset=StoreSequences(store))
    resumed.train(resume_from_checkpoint=True)
    assert len(reads) == 2  # steps 9 and 10; the 8 trained batches were skipped without reading
    assert [e["step"] for e in logged(resumed)] == list(range(1, 11))  # 1 to 8 from checkpoint-8's history
    for a, b in zip(logged(resumed), logged(reference), strict=True):
        assert (a["loss"], a["kd"], a["ce"], a["grad_norm"]) == (b["loss"], b["kd"], b["ce"], b["grad_norm"])
    for name, tensor in weights(reference.model).items():
        assert torch.equal(tensor, weights(resumed.model)[name]), name


def test_batches_are_the_readers_order_on_every_rank(stores):
    """Two ranks' batch samplers split each global batch of the reader's order; the last is padded with -1."""
    from softcache.data import StoreDataset

    sequences = StoreSequences(stores["text"])
    ranks = [StoreBatches(sequences, 5, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        batches = [list(sampler) for sampler in ranks]
        assert len(batches[0]) == len(batches[1]) == 3  # 24 sequences, global batch 10
        reader = StoreDataset(stores["text"], 5, seed=7, world_size=2, rank=0)
        order = reader.order(epoch)
        flat = [i for b in range(3) for sampler in batches for i in sampler[b]]
        assert flat[:24] == order.tolist() and flat[24:] == [-1] * 6


def test_refusals_are_one_line(stores, student, tmp_path, tiny_teacher, corpus_file):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    args = hf_args(tmp_path / "out")
    with pytest.raises(StoreError, match=r"^\S+ is not a softcache store \(no manifest.json\)$"):
        StoreSequences(str(tmp_path))
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(SoftcacheError, match=r"^model LlamaForCausalLM has 100 output ids but the store's teacher uses "
                                             r"\d+; give the student vocab_size >= \d+$"):
        DistillationTrainer(small, args, train_dataset=StoreSequences(stores["text"]))
    hot = _cache(tiny_teacher, corpus_file, tmp_path / "hot", temperature=2.0, max_sequences=4)
    model = build_student(student, seed=0)
    with pytest.raises(SoftcacheError, match=r"^eval_dataset \S+ was written with temperature 2, not 1 "):
        DistillationTrainer(model, args, train_dataset=StoreSequences(stores["text"]), eval_dataset=StoreSequences(hot))
    other = AutoTokenizer.from_pretrained(tiny_teacher)
    other.add_tokens(["<extra>"])
    with pytest.raises(SoftcacheError, match="^processing_class is a different tokenizer from the store's teacher"):
        DistillationTrainer(model, args, train_dataset=StoreSequences(stores["text"]), processing_class=other)
    for options, message in (({"alpha": 2.0}, "alpha must be in [0, 1], got 2.0"),
                             ({"tail": "cut"}, "tail must be one of bucket, renorm, none or None, got 'cut'"),
                             ({"data_collator": lambda rows: rows}, "DistillationTrainer takes no data_collator"),
                             ({"allow_tokenizer_mismatch": True}, "allow_tokenizer_mismatch was replaced by "
                                                                  'tokenizers="trust-ids"'),
                             ({"tokenizers": "cross"}, "tokenizers='cross': DistillationTrainer takes")):
        with pytest.raises(SoftcacheError, match=re.escape(message)):
            DistillationTrainer(model, args, train_dataset=StoreSequences(stores["text"]), **options)
    with pytest.raises(SoftcacheError, match="^train_dataset must be a softcache.hf.StoreSequences"):
        DistillationTrainer(model, args, train_dataset=[1, 2, 3])


def test_evaluate_gives_softcache_evals_metrics(stores, student, tmp_path):
    from softcache.evaluate import evaluate

    model = build_student(student, seed=0)
    trainer = DistillationTrainer(model, hf_args(tmp_path / "out"), train_dataset=StoreSequences(stores["text"], 0, 20),
                                  eval_dataset=StoreSequences(stores["text"], 20))
    metrics = trainer.evaluate()
    assert metrics.pop("epoch") == 0  # the Trainer's log adds it, as to its own evaluation's metrics
    expected = evaluate(model, stores["text"], 20, 24, batch_size=8)
    assert metrics == {f"eval_{name}": value for name, value in expected.items()}


def readme_example() -> str:
    """The README's Trainer script: the python block that imports softcache.hf."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    found = [block for block in blocks if "from softcache.hf import" in block]
    assert found, "no python block importing softcache.hf in README.md"
    return found[0]


def test_readme_example_runs_and_resumes(stores, student, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = readme_example()
    assert len(script.strip().splitlines()) < 30
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["distil_hf.py", stores["text"], student, str(out)])
    path = tmp_path / "distil_hf.py"
    path.write_text(script)
    runpy.run_path(str(path), run_name="__main__")
    final = out / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size == TINY_VOCAB
    assert len(AutoTokenizer.from_pretrained(final)) == TINY_VOCAB  # the store's tokenizer came with it
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1  # one epoch of 24 sequences, 8 x 4 per step
    runpy.run_path(str(path), run_name="__main__")  # rerun: resumes from checkpoint-1, nothing left to train
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


RANK_SCRIPT = """
import json, sys
from test_hf import hf_args, logged, train

store, student, out = sys.argv[1:4]
trainer = train(store, student, hf_args(out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4),
                fused_linear="on")
if trainer.args.process_index == 0:
    with open(out + "/log.json", "w") as handle:
        json.dump({"world": trainer.args.world_size, "fused": trainer.fused, "log": logged(trainer)}, handle)
"""


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_two_ranks_give_the_one_rank_losses(stores, student, tmp_path):
    """torchrun, 2 gloo ranks x 2 sequences vs 1 rank x 4, on the chat store (the ranks' counts differ) with the fused
    loss through DDP: the same losses and gradient norms."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               stores["chat"], student, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((out / "log.json").read_text())
    assert (two["world"], two["fused"]) == (2, True)
    one = train(stores["chat"], student, hf_args(tmp_path / "one", gradient_accumulation_steps=2, max_steps=4),
                fused_linear="on")
    for a, b in zip(two["log"], logged(one), strict=True):
        for name in ("loss", "kd", "ce", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-5), (a["step"], name)
