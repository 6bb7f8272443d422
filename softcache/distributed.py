"""Running under torchrun: the process group, this process's ranks, and the few collectives the jobs use.

Jobs launched with ``torchrun --nproc-per-node N -m softcache ...`` see ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in their environment; :func:`process_group` joins
torch.distributed's group then and is a no-op otherwise, so a single process needs nothing set up.
This module is the one place that reads where a process stands: the launcher's environment
(:func:`process_group`) and, inside a DataLoader worker, the rank and worker ids (:func:`environment`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import get_worker_info

from softcache.errors import SoftcacheError


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    """Ranks on this process's node (torchrun's LOCAL_WORLD_SIZE)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """``device`` for this process: a bare ``cuda`` becomes this rank's local GPU."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device


@contextlib.contextmanager
def process_group(backend: str, alone: bool = False):
    """Join torchrun's process group (``backend``: gloo or nccl) when launched with WORLD_SIZE > 1;
    yield this process's :class:`Ranks`. The group is left when the block ends.

    ``alone``: outside torchrun, form a group of this one process (FSDP shards over a group);
    otherwise a single process has no group."""
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if single and not alone:
        yield Ranks()
        return
    if dist.is_initialized():  # the caller already joined: use its group, leave it alone
        yield _joined()
        return
    if single:  # an in-memory rendezvous: nothing to reach, nothing for torchrun's variables to say
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend)
    try:
        yield _joined()
    finally:
        dist.destroy_process_group()


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its launch (True outside torchrun), without joining a group."""
    return int(os.environ.get("RANK", "0")) == 0


def _joined() -> Ranks:
    world = dist.get_world_size()
    return Ranks(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def environment() -> tuple[int, int, int, int]:
    """(rank, world size, DataLoader worker id, workers) of the calling process or loader worker."""
    rank, world = 0, 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, workers


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def on_main(ranks: Ranks, work: Callable):
    """Run ``work`` on rank 0 while the other ranks wait; return its result on rank 0 (None elsewhere).

    If it fails with a :class:`SoftcacheError` on rank 0, every rank raises that error, so no rank
    is left waiting for a job that will not run."""
    if ranks.world == 1:
        return work()
    message = [None]
    if ranks.main:
        result, failure = None, None
        try:
            result = work()
        except SoftcacheError as err:
            message, failure = [str(err)], err
        except BaseException as err:  # the other ranks must not wait forever
            message, failure = [f"rank 0 stopped: {type(err).__name__}: {err}"], err
        dist.broadcast_object_list(message, src=0)
        if failure is not None:
            raise failure
        return result
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise SoftcacheError(message[0])
    return None


def broadcast(ranks: Ranks, value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(ranks: Ranks, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place."""
    if ranks.world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
