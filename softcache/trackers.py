"""Experiment trackers: the student job's metrics, also sent to TensorBoard or Weights & Biases.

``metrics.jsonl`` in the run directory stays the record a resumed run truncates and continues; a
tracker receives the same records as they are written (the training fields, and ``eval/...``
fields when there is an evaluation), flattened to scalars. Only rank 0 tracks.

A resumed run continues the tracker's run rather than starting a second one: TensorBoard's writer
drops the events after the checkpoint's step (``purge_step``), and W&B resumes the run whose id is
kept in the run directory (``wandb-run-id``). W&B runs offline unless ``WANDB_MODE`` says
otherwise (``wandb sync OUT/wandb/...`` uploads later), so a job never waits on the network or a
login. Both are optional dependencies (``pip install softcache[trackers]``); asking for one that is
not installed is one error line before training starts.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Protocol

from softcache.errors import SoftcacheError

TRACKERS = ("none", "tensorboard", "wandb")
WANDB_ID = "wandb-run-id"


class Tracker(Protocol):
    def log(self, record: dict) -> None:
        """One metrics record (as written to metrics.jsonl), at its ``step``."""

    def close(self) -> None:
        """Flush and finish."""


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers, nested dicts flattened with ``/`` (``eval/ce``); the step is the x axis."""
    out = {}
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoard:
    """Event files in ``OUT/tensorboard``."""

    def __init__(self, out: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise SoftcacheError("--report-to tensorboard needs the tensorboard package: pip install "
                                 "'softcache[trackers]' (or pip install tensorboard)") from err
        # Events after the checkpoint a resumed run starts from are dropped: the run logs them again.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run in ``OUT/wandb``, offline unless ``WANDB_MODE`` is set; its id is kept for resuming."""

    def __init__(self, out: Path, start_step: int, config: dict):
        try:
            import wandb
        except ImportError as err:
            raise SoftcacheError("--report-to wandb needs the wandb package: pip install 'softcache[trackers]' "
                                 "(or pip install wandb)") from err
        id_file = out / WANDB_ID
        run_id = _saved_id(id_file) if start_step and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(dir=str(out), id=run_id, resume="allow", name=out.name, config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"), project=os.environ.get("WANDB_PROJECT",
                                                                                                   "softcache"))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _saved_id(path: Path) -> str:
    """The run id a resumed run continues: what this module wrote (12 hex digits), nothing else."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise SoftcacheError(f"{path} cannot be read ({err}); delete it to start a new W&B run") from None
    if not re.fullmatch(r"[0-9a-z]{1,64}", text):
        raise SoftcacheError(f"{path} does not hold a W&B run id (lowercase letters and digits); restore it, or "
                             "delete it to start a new W&B run")
    return text


class NoTracker:
    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_tracker(name: str, out: Path, start_step: int, config: dict) -> Tracker:
    """The tracker ``--report-to name`` asks for, writing under the run directory ``out``."""
    if name == "tensorboard":
        return TensorBoard(out, start_step)
    if name == "wandb":
        return WandB(out, start_step, config)
    return NoTracker()
