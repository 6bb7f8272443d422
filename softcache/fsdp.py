"""FSDP students (``softcache train --fsdp``): the student sharded over the ranks instead of replicated.

With DistributedDataParallel every rank holds the whole student, its gradients and its AdamW state
(16 bytes per float32 weight). With PyTorch's FSDP2 (``fully_shard``) each rank keeps a 1/ranks
share of all three; a transformer block's weights are gathered just before its forward and its
backward and freed after, so a rank holds the whole of one block at a time, plus the root's weights
(embeddings, final norm, head), which stay gathered from the forward to the end of the backward.
The price is traffic: an all-gather per block per pass, and a reduce-scatter of the gradients in
place of DDP's all-reduce. The reduce-scatter averages over the ranks as DDP's all-reduce does, so
the job's one averaging rule (sums divided by the step's counts over all ranks, times the number of
ranks) holds unchanged. With --grad-accum, the micro-batches before a step's last do not reduce
(``set_requires_gradient_sync(False)``, FSDP's no_sync): less traffic, but each rank keeps its
unsharded gradients between micro-batches.

On one process (no torchrun) --fsdp shards over a group of one: nothing is saved in memory, but the
run writes the same sharded checkpoints, so it resumes on N ranks and an N-rank run resumes on one
(a 1-rank FSDP run is also how a student that does not fit one GPU trains on one, with
--fsdp-cpu-offload). On CUDA the weights are gathered in bfloat16 and the gradients reduced in
float32 (MixedPrecisionPolicy), the sharded weights and AdamW state stay float32; on CPU nothing is
cast, so CPU runs match DDP's.

With the fused loss (--fused-linear), the FSDP root is the student's Trunk, which holds the whole
model: the root gathers the head with the embeddings, and the loss reads the gathered head weight
after the forward; the head's gradient is reduced with the root's at the end of the backward.

The job's steps replaced here: ``distribute`` (fully_shard instead of DDP), ``gradient_sync``,
``clip_gradients`` (the norm is a sharded tensor), ``evaluate`` (every rank takes part),
``restore`` and ``checkpoint`` (softcache.sharded_checkpoint) and ``save`` (the full weights
gathered on rank 0, saved as one ``from_pretrained`` model).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist

from softcache import checkpoint, sharded_checkpoint
from softcache.config import TrainConfig
from softcache.distributed import Ranks, broadcast, on_main
from softcache.errors import SoftcacheError, one_line
from softcache.evaluate import evaluate
from softcache.logs import note
from softcache.student import save_student
from softcache.train_job import METRICS, StudentJob, _truncate_metrics


def _fully_shard():
    """torch's FSDP2 pieces: (fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy)."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError:
        raise SoftcacheError(f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                             f"{torch.__version__}: upgrade torch, or train without --fsdp") from None
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules to shard one by one: those whose class the model names in ``_no_split_modules``
    (Hugging Face's own list of the blocks that must stay whole, its decoder layers), innermost
    first, so a block inside another is sharded before it. Empty when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in reversed(list(model.modules())) if m is not model and type(m).__name__ in names]


def mixed_precision(device: torch.device):
    """bfloat16 weights for the compute and float32 gradient reduction on CUDA; no casting elsewhere."""
    _, MixedPrecisionPolicy, _, _ = _fully_shard()
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(root: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device,
          cpu_offload: bool = False) -> torch.nn.Module:
    """``fully_shard`` each of ``blocks``, then ``root`` (which takes every weight no block holds), over
    all ranks of the default process group; returns ``root``, now an FSDP module whose parameters
    are sharded DTensors (an optimiser must be built after this)."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, _, CPUOffloadPolicy, OffloadPolicy = _fully_shard()
    options = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),)), "mp_policy": mixed_precision(device),
               "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(root, **options)
    return root


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded ``model`` in CPU memory on rank 0 (empty elsewhere); every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) copy of the Hugging Face ``model`` holding ``weights`` (built on the meta device
    and given the tensors themselves, so no second copy of the weights is made)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no weights made: the gathered ones are assigned, in their own dtype
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.tie_weights()  # tied weights arrive as two tensors
    plain.generation_config = model.generation_config
    return plain


class _Logits(torch.nn.Module):
    """The student's logits through an FSDP root that is its Trunk (the fused loss), for evaluation:
    calling the student itself would skip the root, which gathers the embeddings and the head."""

    def __init__(self, trunk: torch.nn.Module):
        super().__init__()
        self.trunk = trunk

    @property
    def config(self):
        return self.trunk.model.config

    def forward(self, input_ids: torch.Tensor, **inputs):
        hidden = self.trunk(input_ids, **inputs)
        return SimpleNamespace(logits=hidden @ self.trunk.projection.T)  # the head, gathered by the forward


class FSDPStudentJob(StudentJob):
    """The student job with the student sharded by FSDP2 (--fsdp); see the module docstring."""

    sharded = True

    def __init__(self, config: TrainConfig, ranks: Ranks = Ranks()):
        super().__init__(config, ranks)
        _fully_shard()  # a torch without FSDP2 is refused before anything is written
        if config.fsdp_cpu_offload and self.device.type != "cuda":
            raise SoftcacheError(f"--fsdp-cpu-offload moves FSDP's shards off a GPU; on {self.device} they are in CPU "
                                 "memory already: drop --fsdp-cpu-offload, or train on --device cuda")

    def distribute(self, module: torch.nn.Module) -> torch.nn.Module:
        blocks = transformer_blocks(self.model)
        if not blocks:
            note(self.ranks, f"note: {type(self.model).__name__} names no transformer blocks (_no_split_modules); "
                             "--fsdp shards it as one unit, so each rank gathers all of its weights for every pass")
        if self.ranks.world == 1:
            note(self.ranks, "note: --fsdp on one process shards over a group of one: no memory is saved, the "
                             "checkpoints are sharded (they resume on any number of ranks)")
        return shard(module, blocks, self.device, self.config.fsdp_cpu_offload)

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool):
        self.trained.set_requires_gradient_sync(sync)
        yield

    def clip_gradients(self) -> torch.Tensor:
        return super().clip_gradients().full_tensor()  # the norm of sharded gradients is a DTensor

    def evaluate(self) -> dict:
        """Held-out metrics; every rank evaluates the whole held-out set (each forward gathers the weights
        from all ranks), rank 0 records them."""
        return evaluate(_Logits(self.trained) if self.fused else self.model, *self.evaluation,
                        batch_size=self.config.batch_size, device=self.device,
                        temperature=self.store.targets.temperature, chunk_tokens=self.config.chunk_tokens,
                        autocast_dtype=self.autocast, view=self.config.view)

    def restore(self) -> None:
        """With --resume, load the newest sharded checkpoint (on any number of ranks: DCP reshards)."""
        found = broadcast(self.ranks, sharded_checkpoint.latest(self.out)
                          if self.config.resume and self.ranks.main else None)
        if found is not None:
            state = sharded_checkpoint.load(found, self.model, self.optimizer)
            try:
                self.scheduler.load_state_dict(state["scheduler"])
                checkpoint.set_rng_state(state["rng"])
            except Exception as err:  # torch's loaders raise many types for a state of another shape
                raise SoftcacheError(f"checkpoint {found} does not fit this run's schedule ({one_line(err)}); resume "
                                     "with the original settings, or start a new --out") from err
            self.step = self.checkpointed = state["step"]
            note(self.ranks, f"resuming from {found.name} (step {self.step:,} of {self.total_steps:,}), written by "
                             f"{state.get('world_size', '?')} rank(s)")
        elif self.config.resume:
            note(self.ranks, f"no checkpoint in {self.out}; starting from step 0")
        if self.ranks.main:
            _truncate_metrics(self.out / METRICS, self.step)

    def checkpoint(self) -> None:
        """Every rank writes its shards; rank 0 the rest (softcache.sharded_checkpoint), atomically."""
        self.reader.batches_consumed = self.step * self.config.grad_accum
        sharded_checkpoint.save(self.out, self.step, self.model, self.optimizer, {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state(),
            "reader": self.reader.to_dict(), "world_size": self.ranks.world,
        }, self.ranks)
        self.checkpointed = self.step

    def save(self) -> None:
        """The full weights gathered on rank 0, saved as one ``from_pretrained`` model in OUT/final."""
        weights = full_weights(self.model)
        on_main(self.ranks, lambda: save_student(unsharded(self.model, weights), self.tokenizer_source, self.out / "final"))
