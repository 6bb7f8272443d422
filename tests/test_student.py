"""Students from anywhere (softcache.student, softcache.hub): a pretrained student's weights are the
ones it starts from, a hub id is found in the local Hugging Face cache with no network, and
--student-dtype bfloat16 trains and resumes on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softcache import SoftcacheError
from softcache.student import build_student, find_student
from softcache.train_job import StudentJob, run_train

from conftest import interrupted as interrupted_run
from conftest import make_student, put_in_hub_cache
from test_train import metrics, student_config, train_config, trained_store  # noqa: F401  (fixtures)

REPO = "softcache-tests/tiny-student"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return make_student(tmp_path_factory.mktemp("pretrained") / "student")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, pretrained):
    """A Hugging Face cache holding the pretrained student as REPO, read offline (as HF_HOME and
    HF_HUB_OFFLINE=1 set them when huggingface_hub is imported)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    snapshot = put_in_hub_cache(cache, REPO, pretrained)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_a_pretrained_students_weights_are_loaded_not_reinitialised(pretrained, tmp_path):
    saved = _saved(pretrained)
    for seed in (0, 123):  # the seed initialises nothing that the weights give
        state = build_student(str(pretrained), seed).state_dict()
        assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    random_init = build_student(str(student_config(tmp_path / "student.json")), 0).state_dict()
    assert not torch.equal(random_init["model.layers.0.mlp.up_proj.weight"], saved["model.layers.0.mlp.up_proj.weight"])


def test_the_first_loss_is_the_pretrained_models_loss_on_the_batch(train_config, pretrained, tmp_path):  # noqa: F811
    """The first step's logged loss is computed before the optimiser moves: on the pretrained weights."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from softcache.data import StoreDataset

    config = train_config(student=str(pretrained), steps=1)
    run_train(config)
    first = metrics(tmp_path / "run")[0]
    job = StudentJob(train_config(student=str(pretrained), out=str(tmp_path / "reference")))
    job.setup_store()  # the job's own loss settings and train/held-out split
    batch = next(iter(DataLoader(StoreDataset(config.store, config.batch_size, seed=config.seed, stop=job.train_stop),
                                 batch_size=None)))
    model = AutoModelForCausalLM.from_pretrained(pretrained).train()
    with torch.no_grad():
        kd, ce = job.loss(model(input_ids=batch["input_ids"]).logits, batch)
    assert first["kd"] == pytest.approx(float(kd / batch["mask"].sum()), rel=1e-6)
    assert first["ce"] == pytest.approx(float(ce / (batch["labels"] >= 0).sum()), rel=1e-6)
    random_init = metrics_of_one_step(train_config, tmp_path / "random")
    assert abs(random_init["ce"] - first["ce"]) > 1e-3  # the weights made the difference


def metrics_of_one_step(train_config, out: Path) -> dict:  # noqa: F811
    run_train(train_config(out=str(out), steps=1))
    return metrics(out)[0]


def test_training_from_a_pretrained_student_resumes_exactly(train_config, pretrained, tmp_path, monkeypatch):  # noqa: F811
    settings = dict(student=str(pretrained), steps=5, checkpoint_every=2)
    run_train(train_config(out=str(tmp_path / "reference"), **settings))
    interrupted = train_config(out=str(tmp_path / "interrupted"), **settings)
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 4, lambda: run_train(interrupted))
    interrupted.resume = True
    assert run_train(interrupted).steps == 3  # steps 3..5 after the step-2 checkpoint
    ours, theirs = metrics(tmp_path / "interrupted"), metrics(tmp_path / "reference")
    assert [(m["loss"], m["kd"], m["ce"]) for m in ours] == [(m["loss"], m["kd"], m["ce"]) for m in theirs]
    reference, resumed = _saved(tmp_path / "reference" / "final"), _saved(tmp_path / "interrupted" / "final")
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    assert not torch.equal(reference["model.layers.0.mlp.up_proj.weight"],
                           _saved(pretrained)["model.layers.0.mlp.up_proj.weight"])  # it trained


def test_bfloat16_trains_in_bfloat16_on_cpu_and_resumes_exactly(train_config, pretrained, tmp_path, monkeypatch):  # noqa: F811
    settings = dict(student=str(pretrained), steps=5, checkpoint_every=2, student_dtype="bfloat16")
    run_train(train_config(out=str(tmp_path / "reference"), **settings))
    final = _saved(tmp_path / "reference" / "final")
    assert {tensor.dtype for tensor in final.values()} == {torch.bfloat16}
    interrupted = train_config(out=str(tmp_path / "interrupted"), **settings)
    interrupted_run(monkeypatch, torch.optim.AdamW, "step", 4, lambda: run_train(interrupted))
    interrupted.resume = True
    run_train(interrupted)
    assert metrics(tmp_path / "interrupted") == [{**m, "tokens_per_s": r["tokens_per_s"]} for m, r in
                                                  zip(metrics(tmp_path / "reference"), metrics(tmp_path / "interrupted"))]
    resumed = _saved(tmp_path / "interrupted" / "final")
    assert all(torch.equal(final[name], resumed[name]) for name in final)
    float32 = train_config(out=str(tmp_path / "float32"), student=str(pretrained), steps=5, checkpoint_every=2)
    run_train(float32)
    for a, b in zip(metrics(tmp_path / "reference"), metrics(tmp_path / "float32")):  # to bf16's precision
        assert a["kd"] == pytest.approx(b["kd"], rel=2e-2)


def test_a_hub_id_is_found_in_the_local_cache_offline(hub_cache, pretrained, train_config, tmp_path):  # noqa: F811
    source = find_student(REPO)
    assert source.path == hub_cache and source.hub.revision == hub_cache.name and source.base_name == REPO
    state = build_student(REPO, 0).state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in _saved(pretrained).items())
    run_train(train_config(student=REPO, steps=2))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["student"] == REPO
    run_train(train_config(student=REPO, steps=2, out=str(tmp_path / "lora"), lora_r=2))
    adapter = json.loads((tmp_path / "lora" / "final" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (REPO, hub_cache.name)


def test_a_hub_id_not_in_the_cache_is_one_clear_error(hub_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(SoftcacheError, match=rf"^--student softcache-tests/absent is not a file or directory, nor a "
                                             rf"model in the Hugging Face cache {constants.HF_HUB_CACHE}, and "
                                             rf"HF_HUB_OFFLINE is set: download it"):
        build_student("softcache-tests/absent", 0)
    for weights in hub_cache.glob("*.safetensors"):
        weights.unlink()  # the config alone, as AutoConfig.from_pretrained leaves a cache
    with pytest.raises(SoftcacheError, match=r"its snapshot in the Hugging Face cache .* holds no weights"):
        build_student(REPO, 0)
    with pytest.raises(SoftcacheError, match=r"no/such/student does not exist \(give a config.json, a model directory "
                                             r"or a hub id\)"):
        build_student("no/such/student", 0)  # not a hub id: the cache is not asked

    def unreachable(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise LocalEntryNotFoundError("Cannot reach the hub")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    with pytest.raises(SoftcacheError, match=r"nor a model in the Hugging Face cache .*, and the hub could not be "
                                             r"reached \(LocalEntryNotFoundError: Cannot reach the hub\)"):
        build_student("softcache-tests/absent", 0)


def test_the_command_line_reads_hf_home_and_hf_hub_offline(trained_store, pretrained, tmp_path):  # noqa: F811
    """The environment as a user sets it, read by huggingface_hub when the command starts."""
    put_in_hub_cache(tmp_path / "hf" / "hub", REPO, pretrained)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)

    def train(student: str, out: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "softcache", "train", "--store", str(trained_store), "--student", student,
                   "--out", str(tmp_path / out), "--steps", "1", "--batch-size", "4", "--num-workers", "0",
                   "--no-progress"]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    found = train(REPO, "run")
    assert found.returncode == 0 and "trained 1 steps" in found.stdout, found.stderr
    missing = train("softcache-tests/absent", "missing")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith(f"error: --student softcache-tests/absent is not a file or directory, nor a model "
                                     f"in the Hugging Face cache {tmp_path / 'hf' / 'hub'}, and HF_HUB_OFFLINE is set")
