"""LoRA students (softcache.lora): only the adapter trains, a killed run resumes exactly, final/ loads
with peft and final/merged with AutoModelForCausalLM, and the flags' mistakes are refused by name."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from softcache import SoftcacheError
from softcache.config import TrainConfig
from softcache.train_job import StudentJob, run_train

from conftest import interrupted as interrupted_run
from conftest import make_student
from test_train import metrics, student_config, trained_store  # noqa: F401  (trained_store is a fixture)

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("pretrained") / "student")


@pytest.fixture
def lora_config(trained_store, pretrained, tmp_path):  # noqa: F811
    def build(**overrides) -> TrainConfig:
        options = dict(store=str(trained_store), student=str(pretrained), out=str(tmp_path / "run"), steps=6,
                       batch_size=4, lr=2e-2, eval_fraction=0.2, checkpoint_every=2, num_workers=0, progress=False,
                       lora_r=4)
        options.update(overrides)
        return TrainConfig(**options)

    return build


def _adapter_modules(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_only_the_adapter_trains_and_final_loads_with_peft_and_merged(lora_config, pretrained, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_train(lora_config(merge_lora=True, eval_every=3))
    run = tmp_path / "run"
    lines = metrics(run)
    assert lines[-1]["kd"] < lines[0]["kd"] and result.final_eval["kl"] > 0
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert state["model"] and all(".lora_A." in name or ".lora_B." in name for name in state["model"])
    assert len(state["frozen_sha256"]) == 64

    base = AutoModelForCausalLM.from_pretrained(pretrained)
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, run / "final")
    assert _adapter_modules(adapted) == PROJECTIONS  # all-linear on a Llama: the seven projections, not the head
    again = AutoPeftModelForCausalLM.from_pretrained(run / "final")  # finds the base by the name it saved
    assert again.peft_config["default"].base_model_name_or_path == str(pretrained.resolve())
    merged = AutoModelForCausalLM.from_pretrained(run / "final" / "merged")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, expected)
    for name, tensor in merged.state_dict().items():  # the adapter moved the projections only
        changed = not torch.equal(tensor, original[name])
        assert changed == (name.rsplit(".", 2)[-2] in PROJECTIONS), name
    assert len(AutoTokenizer.from_pretrained(run / "final")) == len(AutoTokenizer.from_pretrained(run / "final" / "merged"))


def test_resume_after_a_kill_gives_the_uninterrupted_losses_and_adapter(lora_config, tmp_path, monkeypatch):
    """Dropout on the adapters' input draws from the RNG: the checkpoint's RNG state makes it repeat."""
    from safetensors.torch import load_file

    settings = dict(steps=7, checkpoint_every=3, grad_accum=2, lora_dropout=0.1)
    run_train(lora_config(out=str(tmp_path / "reference"), **settings))
    interrupted = lora_config(out=str(tmp_path / "interrupted"), **settings)
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 5, lambda: run_train(interrupted))  # during step 5
    assert [m["step"] for m in metrics(tmp_path / "interrupted")] == [1, 2, 3, 4]
    interrupted.resume = True
    assert run_train(interrupted).steps == 4
    ours, theirs = metrics(tmp_path / "interrupted"), metrics(tmp_path / "reference")
    assert [m["step"] for m in ours] == list(range(1, 8))
    for a, b in zip(ours, theirs):
        assert (a["loss"], a["kd"], a["ce"], a["lr"], a["grad_norm"]) == (b["loss"], b["kd"], b["ce"], b["lr"],
                                                                          b["grad_norm"])
    reference = load_file(tmp_path / "reference" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "final" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_the_first_step_sees_the_pretrained_model(lora_config, pretrained, tmp_path):
    """LoRA's B starts at zero: the first step's loss is the full fine-tuning run's, from the same weights."""
    run_train(lora_config(out=str(tmp_path / "lora"), steps=2))
    run_train(lora_config(out=str(tmp_path / "full"), steps=2, lora_r=0))
    first_lora, first_full = metrics(tmp_path / "lora")[0], metrics(tmp_path / "full")[0]
    assert first_lora["kd"] == pytest.approx(first_full["kd"], rel=1e-6)
    assert first_lora["ce"] == pytest.approx(first_full["ce"], rel=1e-6)


def test_the_fused_loss_is_used_and_trains_like_the_logits_loss(lora_config, tmp_path):
    jobs = {}
    for fused in ("on", "off"):
        config = lora_config(out=str(tmp_path / fused), steps=3, fused_linear=fused)
        run_train(config)
        job = StudentJob(config)
        job.setup_store()
        job.config.resume = True
        job.setup_model()
        job.setup_optimizer()
        job.setup_forward()
        jobs[fused] = job
    assert jobs["on"].fused and not jobs["off"].fused
    for a, b in zip(metrics(tmp_path / "on"), metrics(tmp_path / "off")):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def test_target_modules_by_name(lora_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = lora_config(steps=1, lora_target_modules="q_proj, self_attn.v_proj", lora_alpha=4.0)
    run_train(config)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.student), tmp_path / "run" / "final")
    assert _adapter_modules(adapted) == {"q_proj", "v_proj"}
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 4.0)
    with pytest.raises(SoftcacheError, match=r"^--lora-target-modules: 'qkv_proj' is not a linear module of --student "
                                             r".*; its linear modules are down_proj, gate_proj, k_proj, lm_head, o_proj, "
                                             r"q_proj, up_proj, v_proj \(or give all-linear\)$"):
        run_train(lora_config(out=str(tmp_path / "bad"), lora_target_modules="q_proj,qkv_proj"))
    assert not (tmp_path / "bad").exists()


def test_bfloat16_on_cpu_trains_a_float32_adapter_on_a_bfloat16_base(lora_config, tmp_path):
    job = StudentJob(lora_config(student_dtype="bfloat16", fused_linear="on", out=str(tmp_path / "inspected")))
    job.setup_store()
    job.setup_model()
    dtypes = {(p.requires_grad, p.dtype) for p in job.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    job.setup_optimizer()
    job.setup_forward()
    assert job.fused  # a bfloat16 head is still a plain linear map of the hidden states
    run_train(lora_config(out=str(tmp_path / "bf16"), student_dtype="bfloat16", fused_linear="on"))
    run_train(lora_config(out=str(tmp_path / "fp32")))
    for a, b in zip(metrics(tmp_path / "bf16"), metrics(tmp_path / "fp32")):  # the same run, to bf16's precision
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-2) and a["ce"] == pytest.approx(b["ce"], rel=2e-2)


def test_a_resume_on_changed_frozen_weights_is_refused(lora_config, tmp_path):
    student = make_student(tmp_path / "student")
    run_train(lora_config(student=str(student), steps=2))
    make_student(student, seed=8)  # the same config, other weights: the adapter would resume on another model
    with pytest.raises(SoftcacheError, match=r"was trained on other frozen weights than --student .* holds now"):
        run_train(lora_config(student=str(student), steps=2, resume=True))


def test_lora_needs_a_pretrained_student_peft_and_its_rank(lora_config, tmp_path, monkeypatch):
    random_init = student_config(tmp_path / "student.json")
    with pytest.raises(SoftcacheError, match=r"--lora-r trains an adapter on a pretrained student, but --student "
                                             r".*student.json has no weights"):
        run_train(lora_config(student=str(random_init)))
    for flags, named in [({"merge_lora": True}, "--merge-lora"), ({"lora_alpha": 8.0}, "--lora-alpha"),
                         ({"lora_dropout": 0.1}, "--lora-dropout"), ({"lora_target_modules": "q_proj"},
                                                                      "--lora-target-modules")]:
        with pytest.raises(SoftcacheError, match=f"^{named} needs --lora-r: LoRA is off at --lora-r 0"):
            run_train(lora_config(lora_r=0, **flags))
    with pytest.raises(SoftcacheError, match="--lora-target-modules ' , ' names no module"):
        run_train(lora_config(lora_target_modules=" , "))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(SoftcacheError, match=r"^--lora-r needs the peft package, which is not installed: pip install "
                                             r"'softcache\[lora\]'"):
        run_train(lora_config())
    assert not (tmp_path / "run").exists()


def test_eval_reads_the_adapter_directory_as_its_base_with_the_adapter_merged(lora_config, trained_store, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from softcache.cli import main

    run_train(lora_config(merge_lora=True, steps=3))
    evaluations = {}
    for model in ("final", "final/merged"):
        result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run" / model), "--store",
                                           str(trained_store), "--max-sequences", "8", "--json"])
        assert result.exit_code == 0, result.output
        evaluations[model] = json.loads(result.output)
    assert evaluations["final"]["tokens"] == evaluations["final/merged"]["tokens"] == 8 * 31
    for name in ("ce", "kl", "top1_agreement"):
        assert evaluations["final"][name] == pytest.approx(evaluations["final/merged"][name], rel=1e-5)
    config = tmp_path / "run" / "final" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(tmp_path / "gone")}))
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "run" / "final"), "--store", str(trained_store)])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: --model {tmp_path / 'run' / 'final'}: the adapter's base {tmp_path / 'gone'} does not exist (give a "
        "config.json, a model directory or a hub id)"]
