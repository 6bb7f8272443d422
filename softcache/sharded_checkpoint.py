"""Sharded training checkpoints (FSDP): one directory per checkpoint, every rank writing its own shards.

A checkpoint of step N is ``checkpoints/step-00000000N/`` holding the model's and the optimiser's
tensors as torch.distributed.checkpoint (DCP) wrote them (``.metadata`` and one ``__R_0.distcp``
per rank) and ``state.pt``: everything that is not a shard (step, schedule, optimiser settings,
rank 0's RNG states, reader state, ranks), small and rank 0's. DCP stores each tensor with its
place in the whole, so a checkpoint loads on any number of ranks (it reshards).

Atomic, as single-file checkpoints are (softcache.checkpoint): the ranks write into a temporary
directory that rank 0 renames to ``step-N`` only when every rank's shards, DCP's index and
``state.pt`` are on disk. A crash leaves a temporary directory, which :func:`latest` removes, so
``--resume`` never picks a half-written checkpoint. The run directory must be on a filesystem every
rank sees (one machine, or a shared one).

Untrusted run directories stay safe: DCP reads its index with ``pickle`` and any non-tensor value
with ``torch.load(weights_only=False)``, either of which could run code. So only tensors go into
DCP (the optimiser's settings go to ``state.pt``, loaded with ``weights_only=True``), the index is
read with an unpickler that builds only DCP's own metadata types, and an index naming anything but
tensors is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as metadata_module
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from softcache import checkpoint
from softcache.distributed import Ranks, on_main
from softcache.errors import SoftcacheError, one_line
from softcache.store.files import TMP_MARK, atomic_file, fsync_path, remove_temporaries

STATE = "state.pt"
INDEX = ".metadata"  # DCP's index of the shards, written last by its coordinator (rank 0)


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         ranks: Ranks, keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` (called on every rank): the sharded ``model`` and ``optimizer``,
    and ``state`` (rank 0's). Drop all but the newest ``keep``. A failed write (a full disk) raises
    :class:`SoftcacheError` on every rank and leaves the older checkpoints."""
    directory = run_dir / checkpoint.DIRECTORY
    final = directory / f"step-{step:09d}"
    staging = final.with_name(f"{final.name}{TMP_MARK}writing")  # one run writes at a time (run.lock)
    on_main(ranks, lambda: _fresh(staging, step))
    weights, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": weights, "optimizer": optimizer_state["state"]}, checkpoint_id=staging)
    except CheckpointException as err:  # every rank raises it, with every rank's failure
        cause = next((exc for exc, _ in err.failures.values() if isinstance(exc, OSError)), None)
        if cause is None:
            raise
        raise _write_failed(step, directory, cause) from err
    state = {**state, "param_groups": optimizer_state["param_groups"]}
    on_main(ranks, lambda: _publish(staging, final, state, keep))
    return final


def _fresh(staging: Path, step: int) -> None:
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as err:
        raise _write_failed(step, staging.parent, err) from err


def _publish(staging: Path, final: Path, state: dict, keep: int) -> None:
    """Rank 0: add ``state.pt``, rename the finished directory into place, drop the oldest."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        with atomic_file(staging / STATE) as handle:
            handle.write(buffer.getvalue())
        if final.exists():  # a checkpoint of this step that a resume passed over (damaged)
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_path(final.parent)
    except OSError as err:
        raise _write_failed(state["step"], final.parent, err) from err
    for old in published(final.parent)[:-keep]:
        doomed = old.with_name(f"{old.name}{TMP_MARK}old")  # never a half-deleted checkpoint under its name
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _write_failed(step: int, directory: Path, err: OSError) -> SoftcacheError:
    return SoftcacheError(f"could not write the checkpoint of step {step} to {directory} ({err.strerror or err}); "
                          "the older checkpoints are kept: free space or fix the problem and rerun with --resume")


def published(directory: Path) -> list[Path]:
    """The checkpoint directories in ``directory``, oldest first."""
    return sorted(p for p in directory.glob("step-*") if p.is_dir() and TMP_MARK not in p.name)


def latest(run_dir: Path) -> Path | None:
    """The newest sharded checkpoint in ``run_dir`` (crash leftovers are removed first), or None."""
    directory = run_dir / checkpoint.DIRECTORY
    if not directory.is_dir():
        return None
    remove_temporaries(directory)
    found = published(directory)
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the checkpoint at ``path`` into the sharded ``model`` and ``optimizer`` (every rank, any
    number of ranks); return its ``state.pt`` (step, scheduler, rng, reader, ...)."""
    for name in (STATE, INDEX):
        if not (path / name).is_file():
            raise SoftcacheError(f"checkpoint {path} lacks its {name}; it is damaged: delete the directory to "
                                 "resume from an older one")
    state = checkpoint.load(path / STATE, parts=("scheduler", "rng"))
    if not isinstance(state.get("param_groups"), list):
        raise SoftcacheError(f"checkpoint {path / STATE} is not a softcache sharded checkpoint (it lacks the "
                             "optimiser's param_groups)")
    index = read_index(path)
    weights, optimizer_state = get_state_dict(model, optimizer)
    shards = {"model": weights, "optimizer": optimizer_state["state"]}
    try:
        dcp.load(shards, storage_reader=_Reader(path, index))
        set_state_dict(model, optimizer, model_state_dict=shards["model"],
                       optim_state_dict={"state": shards["optimizer"], "param_groups": state["param_groups"]})
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException; loaders raise many types
        raise SoftcacheError(f"checkpoint {path} does not fit this run's student or optimiser ({_cause(err)}); "
                             "was --student changed in place? Resume with the original student, or start a new "
                             "--out") from err
    return state


def _cause(err: BaseException) -> str:
    """One line for ``err``; for DCP's CheckpointException, the first rank's own failure."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return one_line(err)


def read_index(path: Path):
    """DCP's index of the checkpoint at ``path``, read with :class:`_IndexUnpickler`; refused when it names
    anything but tensors (DCP loads a tensor's bytes with ``weights_only=True``, other values without)."""
    try:
        with open(path / INDEX, "rb") as handle:
            index = _IndexUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        raise SoftcacheError(f"checkpoint {path}: its {INDEX} {err}; it is not loaded") from err
    except Exception as err:  # a damaged file raises many types
        raise SoftcacheError(f"checkpoint {path}: its {INDEX} is damaged ({one_line(err)}); delete the directory to "
                             "resume from an older one") from err
    entries = getattr(index, "state_dict_metadata", None)
    if not isinstance(index, Metadata) or not isinstance(entries, dict):
        raise SoftcacheError(f"checkpoint {path}: its {INDEX} is not DCP's index; delete the directory to resume "
                             "from an older one")
    others = [key for key, entry in entries.items() if not isinstance(entry, TensorStorageMetadata)]
    if others:
        raise SoftcacheError(f"checkpoint {path} holds values other than tensors (e.g. {others[0]}), which DCP would "
                             "unpickle and could run code; it is not loaded")
    return index


class _Reader(FileSystemReader):
    """DCP's file reader, with the index already read (and checked) by :func:`read_index`."""

    def __init__(self, path: Path, index: Metadata):
        super().__init__(path)
        self.index = index

    def read_metadata(self, *args, **kwargs) -> Metadata:
        self.index.storage_meta = self.index.storage_meta or StorageMeta()
        self.index.storage_meta.load_id = self.load_id
        return self.index


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's index and nothing else: the classes of torch.distributed.checkpoint.metadata, DCP's
    storage records, torch sizes, dtypes and layouts, and paths. Any other global is refused before
    it is looked up."""

    ALLOWED = {"torch.distributed.checkpoint.filesystem": {"_StorageInfo"}, "torch": {"Size"},
               "torch.serialization": {"_get_layout"},
               "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}}

    def find_class(self, module: str, name: str):
        if not self._allowed(module, name):
            raise pickle.UnpicklingError(f"names {module}.{name}, which softcache does not build (it could run code)")
        return super().find_class(module, name)

    def _allowed(self, module: str, name: str) -> bool:
        if module == "torch.distributed.checkpoint.metadata":  # the index's own dataclasses and enums
            found = getattr(metadata_module, name, None)
            return isinstance(found, type) and found.__module__ == module
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return True
        return name in self.ALLOWED.get(module, ())
