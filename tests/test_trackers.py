"""--report-to: the student job's metrics reach TensorBoard and W&B (offline), also across a resume."""

from __future__ import annotations

import json

import pytest
import torch

from softcache.train_job import run_train
from softcache.trackers import scalars

from conftest import interrupted
from test_train import metrics, train_config, trained_store  # noqa: F401 -- fixtures


def tensorboard_scalars(run) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_scalars_flatten_records():
    record = {"step": 3, "loss": 1.5, "tokens": 12, "eval": {"ce": 2.0, "kl": 0.5}, "note": "x", "flag": True}
    assert scalars(record) == {"loss": 1.5, "tokens": 12.0, "eval/ce": 2.0, "eval/kl": 0.5}


def test_tensorboard_holds_what_metrics_jsonl_holds_across_a_resume(train_config, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    config = train_config(out=str(tmp_path / "run"), steps=6, checkpoint_every=2, eval_every=3, report_to="tensorboard")
    interrupted(monkeypatch, torch.optim.AdamW, "step", 4, lambda: run_train(config))  # steps 1-3 logged, 2 kept
    config.resume = True
    run_train(config)
    logged, written = tensorboard_scalars(tmp_path / "run"), metrics(tmp_path / "run")
    assert sorted(logged["loss"]) == [1, 2, 3, 4, 5, 6]  # step 3 of the first attempt was purged, then logged again
    for record in written:
        for name, value in scalars(record).items():
            assert logged[name][record["step"]] == pytest.approx(value, rel=1e-6), (name, record["step"])
    assert sorted(logged["eval/ce"]) == [3, 6]


def test_wandb_runs_offline_and_a_resume_continues_its_run(train_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = train_config(out=str(tmp_path / "run"), steps=4, checkpoint_every=2, report_to="wandb")
    interrupted(monkeypatch, torch.optim.AdamW, "step", 4, lambda: run_train(config))
    run_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    config.resume = True
    run_train(config)
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one run, written in two attempts
    assert all(any(r.glob("*.wandb")) for r in runs)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["report_to"] == "wandb"


def test_a_missing_tracker_package_is_one_line(train_config, tmp_path, monkeypatch):
    import builtins

    from softcache import SoftcacheError

    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(SoftcacheError, match=r"--report-to tensorboard needs the tensorboard package"):
        run_train(train_config(out=str(tmp_path / "run"), report_to="tensorboard"))


@pytest.mark.parametrize("content", ["../../etc\n", "", "x" * 65, "\xff"])
def test_a_damaged_wandb_run_id_is_one_line(tmp_path, content):
    from softcache import SoftcacheError
    from softcache.trackers import WANDB_ID, _saved_id

    path = tmp_path / WANDB_ID
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(SoftcacheError, match=WANDB_ID):
        _saved_id(path)
    path.write_text("a1b2c3\n")
    assert _saved_id(path) == "a1b2c3"
