"""Training checkpoints: one file per checkpoint, written atomically, newest found by name.

A checkpoint holds the model, optimiser and scheduler states, every RNG state and the reader state,
so that a resumed run continues exactly where the checkpoint was taken (for a LoRA student, the
adapter in place of the model, and the sha256 of the frozen weights it was trained on:
softcache.lora). The newest ``keep`` files
are kept. Everything in a checkpoint is tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: a run directory from someone else cannot run code on --resume.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch

from softcache.errors import SoftcacheError
from softcache.store.files import atomic_file, remove_temporaries

DIRECTORY = "checkpoints"


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (numpy's key array as an int64 tensor)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position),
                                                    int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and drop all but the newest ``keep``. A failed write
    (a full disk) raises :class:`SoftcacheError` naming the directory and leaves the older ones."""
    directory = run_dir / DIRECTORY
    path = directory / f"step-{step:09d}.pt"
    writer = None
    try:
        with atomic_file(path) as handle:
            writer = _Writer(handle)
            torch.save(state, writer)
    except (OSError, RuntimeError) as err:
        if _stopped_by_ctrl_c(err):  # torch reports a Ctrl-C inside torch.save as a RuntimeError about positions
            raise KeyboardInterrupt from None
        cause = writer.error if writer is not None and writer.error is not None else err
        if not isinstance(cause, OSError):
            raise
        raise SoftcacheError(f"could not write the checkpoint of step {step} to {directory} "
                             f"({cause.strerror or cause}); the older checkpoints are kept: free space or fix the "
                             "problem and rerun with --resume") from err
    for old in sorted(directory.glob("step-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _stopped_by_ctrl_c(err: BaseException) -> bool:
    """Whether ``err`` was raised while a KeyboardInterrupt was being handled (its context chain holds one)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__context__
    return False


class _Writer:
    """The file ``torch.save`` writes to, keeping the OSError of a failed write: torch reports it as a
    RuntimeError about stream positions, which would hide the cause (a full disk, say)."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint in ``run_dir`` (crash leftovers are removed first), or None."""
    directory = run_dir / DIRECTORY
    if not directory.is_dir():
        return None
    remove_temporaries(directory)
    found = sorted(directory.glob("step-*.pt"))
    return found[-1] if found else None


def load(path: Path, parts: tuple[str, ...] = ("model", "optimizer", "scheduler", "rng")) -> dict:
    """The checkpoint at ``path``, checked: a mapping with a dict for each of ``parts`` and a step count.
    (A sharded checkpoint's own file holds fewer parts: softcache.sharded_checkpoint.)"""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # torch's words for an object it will not build
            raise SoftcacheError(f"checkpoint {path} is damaged (not a checkpoint file); delete it to resume from "
                                 "an older one") from err
        raise SoftcacheError(f"checkpoint {path} holds objects other than tensors and plain values (written by an "
                             "older softcache, or not by softcache), which could run code; it is not loaded") from err
    except Exception as err:  # a damaged file raises many types
        raise SoftcacheError(f"checkpoint {path} is damaged ({type(err).__name__}); delete it to resume from an "
                             "older one") from err
    if not isinstance(state, dict) or not all(isinstance(state.get(part), dict) for part in parts):
        raise SoftcacheError(f"checkpoint {path} is not a softcache checkpoint (it lacks {', '.join(parts)})")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SoftcacheError(f"checkpoint {path} records step {step!r}, not a step count; delete it to resume from "
                             "an older one")
    return state
