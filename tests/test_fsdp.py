"""FSDP students (--fsdp) on CPU with gloo: the losses of DDP and of one rank, sharded checkpoints that
resume exactly and on another number of ranks, a gathered final/ model, untrusted checkpoints."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from softcache import SoftcacheError, sharded_checkpoint
from softcache.config import TrainConfig
from softcache.train_job import run_train

from conftest import interrupted as interrupted_run
from test_distributed import metrics, torchrun
from test_train import trained_store  # noqa: F401 (fixture)

# Every run: 4 steps of 2 micro-batches of a global batch of 4 sequences, checkpoints at steps 2 and
# 4, evaluation (on every rank under FSDP) on the last 20% of the store at the end.
STEPS = 4


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """Two-block llama students: untied, and with the head tied to the embeddings."""
    root = tmp_path_factory.mktemp("students")
    config = {"model_type": "llama", "vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    (root / "untied.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    (root / "tied.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return {"untied": str(root / "untied.json"), "tied": str(root / "tied.json")}


def args(store, student, out, batch_size: int, *extra, notes: bool = False) -> list:
    """``softcache train`` arguments of a run with a global batch of 4 on 4 // batch_size ranks (the notes on
    stderr when ``notes``)."""
    return ["train", "--store", store, "--student", student, "--out", out, "--steps", STEPS, "--batch-size", batch_size,
            "--grad-accum", 2, "--lr", "5e-3", "--checkpoint-every", 2, "--eval-fraction", "0.2", "--num-workers", 0,
            "--progress" if notes else "--no-progress", *extra]


def config(store, student, out, **overrides) -> TrainConfig:
    """The one-process run of :func:`args`."""
    settings = dict(store=str(store), student=student, out=str(out), steps=STEPS, batch_size=4, grad_accum=2, lr=5e-3,
                    checkpoint_every=2, eval_fraction=0.2, num_workers=0, progress=False)
    return TrainConfig(**{**settings, **overrides})


def two_ranks(*arguments) -> None:
    result = torchrun(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def references(trained_store, students, tmp_path_factory):  # noqa: F811
    """The untied student trained by one process (plain) and by two FSDP ranks."""
    root = tmp_path_factory.mktemp("references")
    run_train(config(trained_store, students["untied"], root / "one"))
    two_ranks(*args(trained_store, students["untied"], root / "fsdp", 2, "--fsdp"))
    return root


@pytest.fixture(scope="module")
def stopped_mid_checkpoint(trained_store, students, tmp_path_factory):  # noqa: F811
    """A two-rank FSDP run stopped in its step-4 checkpoint, after every rank wrote its shards and before
    the checkpoint was published (a kill at the worst moment)."""
    root = tmp_path_factory.mktemp("stopped")
    script = root / "stop.py"
    script.write_text(STOP_MID_CHECKPOINT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               *map(str, args(trained_store, students["untied"], root / "run", 2, "--fsdp"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "interrupted at step 4 of 4" in result.stderr, result.stderr[-3000:]
    return root / "run"


STOP_MID_CHECKPOINT = """
import sys
from softcache import sharded_checkpoint
from softcache.cli import main
publish, calls = sharded_checkpoint._publish, []
def stopped(*args):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return publish(*args)
sharded_checkpoint._publish = stopped
main(sys.argv[1:])
"""


def same_run(ours, theirs, exact: bool = False) -> None:
    """``ours`` trained as ``theirs``: equal step records (to float tolerance unless ``exact``), equal
    evaluation and equal final weights."""
    from transformers import AutoModelForCausalLM

    a, b = metrics(ours), metrics(theirs)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    keys = ("loss", "kd", "ce", "grad_norm", "lr", "tokens")
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] == (y[key] if exact else pytest.approx(y[key], rel=1e-5)), (x["step"], key)
    for key in ("ce", "kl", "top1_agreement", "tokens"):
        assert a[-1]["eval"][key] == (b[-1]["eval"][key] if exact else pytest.approx(b[-1]["eval"][key], rel=1e-5))
    wa = AutoModelForCausalLM.from_pretrained(ours / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(theirs / "final").state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_the_blocks_sharded_one_by_one_are_the_decoder_layers():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from softcache.fsdp import transformer_blocks

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert transformer_blocks(llama) == list(reversed(llama.model.layers))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    assert transformer_blocks(gpt2) == list(reversed(gpt2.transformer.h))


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_fsdp_on_one_process_trains_as_plain_training(trained_store, students, references, tmp_path):  # noqa: F811
    from transformers import AutoTokenizer

    run_train(config(trained_store, students["untied"], tmp_path / "fsdp", fsdp=True))
    same_run(tmp_path / "fsdp", references / "one")
    checkpoints = tmp_path / "fsdp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000002", "step-000000004"]
    assert sorted(p.name for p in (checkpoints / "step-000000004").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                 "state.pt"]
    assert len(AutoTokenizer.from_pretrained(tmp_path / "fsdp" / "final")) == 384


def test_a_store_of_packed_documents_trains_under_fsdp_as_without(cache_config, students, tmp_path):
    from softcache import open_store
    from softcache.cache_job import run_cache

    store = cache_config(out=str(tmp_path / "documents"), packing="documents", long="split", seq_len=64)
    run_cache(store)
    assert "segments" in open_store(store.out).read_rows([0])  # the student sees each document alone
    for name, fsdp in (("plain", False), ("fsdp", True)):
        run_train(config(store.out, students["untied"], tmp_path / name, fsdp=fsdp))
    same_run(tmp_path / "fsdp", tmp_path / "plain")


def test_fsdp_on_two_ranks_gives_the_losses_of_ddp_and_of_one_rank(trained_store, students, references,  # noqa: F811
                                                                    tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    two_ranks(*args(trained_store, students["untied"], tmp_path / "ddp", 2))
    same_run(references / "fsdp", tmp_path / "ddp")
    same_run(references / "fsdp", references / "one")  # gradient norms too: FSDP averages over ranks as DDP does
    final = references / "fsdp" / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2
    assert len(AutoTokenizer.from_pretrained(final)) == 384
    shards = sorted(p.name for p in (references / "fsdp" / "checkpoints" / "step-000000004").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_the_fused_loss_under_fsdp_with_a_tied_head_gives_the_one_rank_losses(trained_store, students,  # noqa: F811
                                                                               tmp_path):
    run_train(config(trained_store, students["tied"], tmp_path / "one"))
    result = torchrun(*args(trained_store, students["tied"], tmp_path / "fused", 2, "--fsdp", "--fused-linear", "on",
                            notes=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not a plain linear head" not in result.stderr  # the loss was fused
    same_run(tmp_path / "fused", tmp_path / "one")


@pytest.mark.slow  # 30 s with its fixture; an unsharded run killed mid-checkpoint: test_crash.py
def test_a_run_stopped_mid_checkpoint_resumes_from_the_one_before_exactly(
        trained_store, students, references, stopped_mid_checkpoint, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(stopped_mid_checkpoint, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000002",
                                                                      "step-000000004.tmp-writing"]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    result = torchrun(*args(trained_store, students["untied"], run, 2, "--fsdp", "--resume", notes=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step-000000002 (step 2 of 4), written by 2 rank(s)" in result.stderr
    same_run(run, references / "fsdp", exact=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000000002", "step-000000004"]


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_a_run_resumes_on_another_number_of_ranks(
        trained_store, students, references, stopped_mid_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    # 2 ranks -> 1: DCP reshards the model and the optimiser; the reader continues the same global batches.
    shutil.copytree(stopped_mid_checkpoint, tmp_path / "two-to-one")
    run_train(config(trained_store, students["untied"], tmp_path / "two-to-one", fsdp=True, resume=True))
    same_run(tmp_path / "two-to-one", references / "fsdp")
    # 1 -> 2
    one = config(trained_store, students["untied"], tmp_path / "one-to-two", fsdp=True)
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 3, lambda: run_train(one))  # during step 3
    two_ranks(*args(trained_store, students["untied"], tmp_path / "one-to-two", 2, "--fsdp", "--resume"))
    same_run(tmp_path / "one-to-two", references / "one")


class _Payload:
    """Pickled into a checkpoint's index: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_sharded_checkpoint_that_would_run_code_is_refused(trained_store, students, tmp_path):  # noqa: F811
    import torch.distributed.checkpoint as dcp

    run = config(trained_store, students["untied"], tmp_path / "run", fsdp=True, steps=2)
    run_train(run)
    newest = tmp_path / "run" / "checkpoints" / "step-000000002"
    marker = tmp_path / "ran"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    run.resume = True
    with pytest.raises(SoftcacheError, match=r"\.metadata names io\.open, which softcache does not build \(it "
                                             r"could run code\); it is not loaded"):
        run_train(run)
    assert not marker.exists()
    # An index naming a value that is not a tensor (DCP would unpickle it with weights_only=False).
    with warnings.catch_warnings():  # DCP's warning that it saves in a single process, as asked
        warnings.simplefilter("ignore")
        dcp.save({"weights": torch.zeros(2), "note": {"text": "hello"}}, checkpoint_id=tmp_path / "mixed", no_dist=True)
    with pytest.raises(SoftcacheError, match="holds values other than tensors .* could run code; it is not loaded"):
        sharded_checkpoint.read_index(tmp_path / "mixed")


def test_a_full_disk_while_writing_shards_is_one_error_keeping_the_older_checkpoint(
        trained_store, students, tmp_path, monkeypatch):  # noqa: F811
    from torch.distributed.checkpoint.api import CheckpointException

    original, calls = sharded_checkpoint.dcp.save, []

    def filling(state, checkpoint_id):  # the second checkpoint meets a full disk after writing a little
        calls.append(checkpoint_id)
        if len(calls) == 2:
            (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
            raise CheckpointException("save", {0: (OSError(28, "No space left on device"), None)})
        return original(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", filling)
    run = config(trained_store, students["untied"], tmp_path / "run", fsdp=True, checkpoint_every=1, steps=3)
    with pytest.raises(SoftcacheError, match=r"could not write the checkpoint of step 2 to .*checkpoints \(No space "
                                             r"left on device\); the older checkpoints are kept"):
        run_train(run)
    assert not (tmp_path / "run" / "final").exists()
    monkeypatch.setattr(sharded_checkpoint.dcp, "save", original)
    run.resume = True
    assert run_train(run).steps == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000002",
                                                                                   "step-000000003"]


def test_a_run_recorded_before_the_fsdp_settings_existed_resumes_as_a_ddp_run(trained_store, students,  # noqa: F811
                                                                              tmp_path):
    run = config(trained_store, students["untied"], tmp_path / "run", steps=2, eval_fraction=0.0)
    run_train(run)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("fsdp", "fsdp_cpu_offload"):
        del record["config"][key]
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    run.resume = True
    assert run_train(run).steps == 0  # accepted: it trained with the settings' defaults
    run.fsdp = True
    with pytest.raises(SoftcacheError, match=r"changed settings \(fsdp: run has False, now True\)"):
        run_train(run)
