"""Distilling a store inside Hugging Face's ``Trainer``: the store is the Trainer's data, softcache's loss its loss.

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...), train_dataset=StoreSequences(store))
    trainer.train()

The trade-off: the Trainer keeps the loop (optimiser, schedule, mixed precision, checkpoints, logging, hub uploads,
launchers, callbacks); softcache keeps the three things that decide whether the result equals ``softcache train``'s,
and replaces the Trainer's version of each:

- **Batch order.** :class:`StoreSequences` is a map-style dataset of the store's sequences, read a whole micro-batch
  per call (``__getitems__``: one read, as :class:`softcache.data.StoreDataset` reads); the batches come from
  :class:`StoreBatches`, a batch sampler that is softcache's order: a pure function of (seed, epoch, shard sizes),
  rank r's slice of every global batch, the last batch of an epoch padded with masked rows. The loader is not handed
  to Accelerate, which would shard the batches a second time and pad ranks by repeating sequences. A resumed run skips
  the trained batches by their indices, without reading them (the Trainer's ``skip_first_batches`` on a batch
  sampler), and ``set_epoch`` gives each epoch its order. An IterableDataset of whole batches (StoreDataset itself)
  would have kept one reader, but the Trainer resumes one by reading and dropping every trained batch, and Accelerate
  re-partitions it from rank 0. Given up: the Trainer's samplers (``train_sampling_strategy``) and
  ``dataloader_drop_last`` do not apply, and the last optimiser step of an epoch has the micro-batches left in it
  (``softcache train`` carries on into the next epoch instead).
- **Loss.** :class:`softcache.losses.DistillationLoss` with the store's temperature and tail unless told otherwise,
  ``alpha x KD + (1 - alpha) x CE``; the model sees each packed document alone (softcache.packing); the output
  projection is fused with the loss where the model allows (``fused_linear``, as in ``softcache train``).
- **Averaging.** KD is divided by the step's count of positions with a target (``mask``), CE by its count of
  positions with a label (``labels >= 0``): two counts, which differ (the last position of a row has a target and no
  label; a chat row's counts differ from row to row), summed over the step's micro-batches and all ranks before the
  first backward. They travel as the Trainer's ``num_items_in_batch`` (:class:`StepCounts`), built in
  :meth:`DistillationTrainer.get_batch_samples`; the Trainer's own count (labels only, shifted) is not used.

Evaluation (``eval_dataset``, ``trainer.evaluate()``) gives ``softcache eval``'s metrics (softcache.evaluate), named
``eval_ce``, ``eval_kl``, ``eval_top1_agreement`` and so on; there is no ``eval_loss``.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Trainer

from softcache.config import FUSED_LINEAR
from softcache.data import StoreDataset, batches_per_epoch, epoch_order, rank_batch
from softcache.distributed import launched_as_main
from softcache.errors import SoftcacheError
from softcache.evaluate import evaluate
from softcache.losses import DIVERGENCES, TAILS, DistillationLoss, Projected
from softcache.models import output_vocab
from softcache.packing import forward_documents, uses_varlen
from softcache.store import Store, open_store
from softcache.student import check_compatible, fusable
from softcache.tokenizer import tokenizer_fingerprint
from softcache.train_job import fuse_wanted

log = logging.getLogger(__name__)


class StoreSequences(Dataset):
    """Sequences [start, stop) of a store as a map-style dataset; item ``i`` is sequence ``start + i``.

    ``dataset.__getitems__(indices)`` returns one batch, a dict of tensors as :meth:`StoreDataset.read` gives it
    (``input_ids`` [B, L] int64, ``target_ids`` and ``target_logprobs`` [B, L, k], ``target_mask``, ``mask`` and
    ``labels`` [B, L], ``segments`` for a documents store); index -1 is a padding row, all masked out.
    """

    def __init__(self, store: str, start: int = 0, stop: int | None = None, allow_incomplete: bool = False,
                 verify_checksums: bool = True):
        self.reader = StoreDataset(store, batch_size=1, start=start, stop=stop, allow_incomplete=allow_incomplete,
                                   verify_checksums=verify_checksums)

    @property
    def path(self) -> str:
        return self.reader.path

    def open(self) -> Store:
        """The store's metadata (a fresh :class:`Store`; the reader opens its own in each worker)."""
        return open_store(self.path, allow_incomplete=self.reader.allow_incomplete)

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """Item indices of epoch ``epoch`` in training order (softcache.data.epoch_order)."""
        return epoch_order(self.reader.shard_sizes, seed, epoch, self.reader.window)

    def __len__(self) -> int:
        return self.reader.num_sequences

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        items = np.asarray(indices, dtype=np.int64)
        return self.reader.read(np.where(items >= 0, items + self.reader.start, -1))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One sequence, without the batch dimension."""
        return {name: tensor[0] for name, tensor in self.__getitems__([index]).items()}


class StoreBatches(Sampler):
    """Batch sampler: the item indices of rank ``rank``'s micro-batches, epoch by epoch (:meth:`set_epoch`).

    Global batch b of an epoch is ``batch_size x world_size`` consecutive entries of the epoch's order, rank r
    takes its slice (softcache.data.rank_batch); the last one is padded with -1 (masked rows), so every rank
    has ``len(self)`` batches and every sequence is seen once per epoch."""

    def __init__(self, sequences: StoreSequences, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return batches_per_epoch(len(self.sequences), self.batch_size * self.world_size)

    def __iter__(self):
        order = self.sequences.order(self.epoch, self.seed)
        for batch in range(len(self)):
            yield rank_batch(order, batch, self.batch_size, self.world_size, self.rank).tolist()


class _EpochLoader(DataLoader):
    """The Trainer calls ``set_epoch`` on its loader before each epoch; this one passes it to the batch sampler.
    (A resumed epoch's loader is a plain one around ``SkipBatchSampler``; the Trainer reaches ours through it.)"""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def _whole(batch: dict) -> dict:
    return batch  # __getitems__ already made the batch


class StepCounts(NamedTuple):
    """An optimiser step's valid positions, summed over its micro-batches and all ranks: the divisors of its sums."""

    kd: torch.Tensor
    """0-d: positions with a teacher target (``mask``)."""
    ce: torch.Tensor
    """0-d: positions with a true next token (``labels >= 0``)."""


def store_loss(store: Store, divergence: str = "fkl", tail: str | None = None, temperature: float | None = None,
               beta: float = 0.5, chunk_tokens: int = 256) -> DistillationLoss:
    """The run's loss: temperature and tail default to the store's (its temperature, its target kind's tail)."""
    targets = store.targets
    temperature = temperature or targets.temperature
    if temperature != targets.temperature and launched_as_main():
        log.info(f"note: the store was written at temperature {targets.temperature:g}; the student uses "
                 f"{temperature:g} (the KD loss is scaled by T^2 = {temperature ** 2:g})")
    tail = tail or targets.spec.default_tail
    if targets.spec.default_tail == "none" and tail != "none" and launched_as_main():
        log.info(f"note: tail={tail!r} on {targets.kind} targets: they sum to 1, so there is no tail and every choice "
                 "gives the same loss up to rounding")
    return DistillationLoss(divergence, tail, temperature, beta, chunk_tokens)


def _check_settings(alpha, divergence, tail, temperature, beta, chunk_tokens, fused_linear) -> None:
    """One SoftcacheError naming the first argument of DistillationTrainer that is out of range."""
    problems = [
        (not 0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha!r}"),
        (divergence not in DIVERGENCES, f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}"),
        (tail is not None and tail not in TAILS, f"tail must be one of {', '.join(TAILS)} or None, got {tail!r}"),
        (temperature is not None and not temperature > 0, f"temperature must be > 0, got {temperature!r}"),
        (not 0 < beta < 1, f"beta must be in (0, 1), got {beta!r}"),
        (not chunk_tokens >= 1, f"chunk_tokens must be >= 1, got {chunk_tokens!r}"),
        (fused_linear not in FUSED_LINEAR,
         f"fused_linear must be one of {', '.join(FUSED_LINEAR)}, got {fused_linear!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise SoftcacheError(message)


def _hidden_states(model, base):
    """``forward(**inputs)`` -> [B, L, H] final hidden states, taken from ``base`` (the unwrapped model's base model)
    while ``model`` (perhaps wrapped in DDP, whose gradient hooks need the call) runs with its head on one position."""

    def forward(**inputs) -> torch.Tensor:
        seen = []
        handle = base.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state))
        try:
            model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        return seen[-1]

    return forward


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distils a store (see the module docstring for what it changes and why).

    Args:
        model: the student, any causal LM whose output vocabulary holds the store's ids.
        args: ``TrainingArguments``, used as the Trainer uses them; ``per_device_train_batch_size`` is the sequences
            per micro-batch and rank, and the data order's seed is ``data_seed`` (else ``seed``).
        train_dataset, eval_dataset: :class:`StoreSequences` (the eval store must share the teacher's tokenizer and
            temperature).
        processing_class: the tokenizer saved with checkpoints; default: the store's. One that differs from the
            store's is refused unless ``tokenizers="trust-ids"``.
        tokenizers: "same" (checked) or "trust-ids" (the student's ids mean the teacher's, unchecked); a student
            with another tokenizer trains through a view with ``softcache train --tokenizers cross``.
        alpha: loss = alpha x KD + (1 - alpha) x CE.
        divergence, tail, temperature, beta, chunk_tokens: the KD loss (softcache.losses.DistillationLoss); tail and
            temperature default to the store's.
        fused_linear: auto, on or off: the loss from the final hidden states and the output projection, chunk by
            chunk, never building the [B, L, V] logits (auto: on CUDA, or above 2 GiB of float32 logits per
            micro-batch; only for a plain linear head, checked at start).
        Other keyword arguments go to ``Trainer`` (callbacks, optimizers, ...); ``data_collator``,
        ``compute_loss_func`` and ``model_init`` are refused: the batches and the loss are softcache's.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's counts: no division by the accumulation

    def __init__(self, model, args=None, *, train_dataset: StoreSequences, eval_dataset: StoreSequences | None = None,
                 processing_class=None, alpha: float = 0.5, divergence: str = "fkl", tail: str | None = None,
                 temperature: float | None = None, beta: float = 0.5, chunk_tokens: int = 256,
                 fused_linear: str = "auto", tokenizers: str = "same", **kwargs):
        _check_settings(alpha, divergence, tail, temperature, beta, chunk_tokens, fused_linear)
        if "allow_tokenizer_mismatch" in kwargs:
            raise SoftcacheError("DistillationTrainer's allow_tokenizer_mismatch was replaced by tokenizers=\"trust-ids\"")
        if tokenizers not in ("same", "trust-ids"):
            raise SoftcacheError(f"tokenizers={tokenizers!r}: DistillationTrainer takes \"same\" or \"trust-ids\"; a "
                                 "student with another tokenizer trains with softcache train --tokenizers cross")
        if refused := sorted(set(kwargs) & {"data_collator", "compute_loss_func", "model_init"}):
            raise SoftcacheError(f"DistillationTrainer takes no {', '.join(refused)}: the batches come whole from "
                                 "the store and the loss is softcache's")
        for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if not isinstance(data, StoreSequences) and (data is not None or name == "train_dataset"):
                raise SoftcacheError(f"{name} must be a softcache.hf.StoreSequences (a store's sequences), got "
                                     f"{type(data).__name__}")
        store = train_dataset.open()
        store.check_tokenizer()
        name = getattr(model, "name_or_path", "") or type(model).__name__
        check_compatible(model, store, name, tokenizers, flag="model", student_files=False)
        if eval_dataset is not None:
            _check_eval_store(eval_dataset.open(), store)
        processing_class = _tokenizer(processing_class, store, tokenizers == "trust-ids")
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        self.store, self.alpha = store, alpha
        self.model_accepts_loss_kwargs = True  # older transformers read this, not loss_is_scaled_for_ga
        self.distillation = store_loss(store, divergence, tail, temperature, beta, chunk_tokens)
        self.fused = self._fuse(fused_linear, train_dataset)
        ignored = [name for name, value in (("train_sampling_strategy", self.args.train_sampling_strategy != "random"),
                                            ("dataloader_drop_last", self.args.dataloader_drop_last)) if value]
        if ignored and launched_as_main():
            log.warning(f"warning: {' and '.join(ignored)} do not apply: the order and the batches are the store "
                        "reader's (softcache.hf)")
        self._logged = torch.zeros(2)  # KD and CE means of the steps since the last log line
        self._logged_steps = 0

    def _fuse(self, choice: str, data: StoreSequences) -> bool:
        """Whether the loss takes hidden states and the head weight (softcache.student.fusable, checked here)."""
        logits_bytes = 4 * self._train_batch_size * self.store.layout.seq_len * output_vocab(self.model)
        if not fuse_wanted(choice, self.args.device, logits_bytes) or self.args.n_gpu > 1:
            return False
        device = next(self.model.parameters()).device
        sample = torch.from_numpy(self.store.read_rows([data.reader.start])["input_ids"]).to(device)
        takes = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if takes and fusable(self.model, sample):
            return True
        if launched_as_main():
            log.info("note: this student's logits are not a plain linear head on its hidden states (or its forward "
                     "takes no logits_to_keep); the loss is computed from the logits")
        return False

    # ---- data -----------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """The store's micro-batches of this rank, in softcache's order (not passed to Accelerate: see the module)."""
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        batches = StoreBatches(self.train_dataset, self._train_batch_size, seed, args.process_index, args.world_size)
        workers = args.dataloader_num_workers
        return _EpochLoader(self.train_dataset, batch_sampler=batches, collate_fn=_whole, num_workers=workers,
                            pin_memory=args.dataloader_pin_memory and args.device.type == "cuda",
                            persistent_workers=args.dataloader_persistent_workers and workers > 0,
                            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
                            generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches and their :class:`StepCounts` over all ranks, which the Trainer hands to
        :meth:`compute_loss` as ``num_items_in_batch``."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        if not batches:
            return batches, None
        counts = torch.stack([sum(b["mask"].sum() for b in batches), sum((b["labels"] >= 0).sum() for b in batches)])
        counts = self.accelerator.reduce(counts.to(device), reduction="sum")
        self._logged_steps += 1
        return batches, StepCounts(counts[0], counts[1])

    # ---- loss -----------------------------------------------------------------------------------

    def student_output(self, model, batch: dict):
        """What the loss takes: [B, L, V] logits, or :class:`Projected` hidden states and head weight when fused.
        A documents store's rows are packed: the model sees each document alone (softcache.packing)."""
        forward = _hidden_states(model, self.model.base_model) if self.fused else model
        if "segments" in batch:
            output = forward_documents(forward, batch["input_ids"], batch["segments"], uses_varlen(self.model))
        else:
            output = forward(input_ids=batch["input_ids"])
        if self.fused:
            return Projected(output, self.model.get_output_embeddings().weight)
        return output.logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """alpha x KD sum / the step's KD count + (1 - alpha) x CE sum / its CE count, for one micro-batch; the
        micro-batches of a step add up to the step's mean. Without :class:`StepCounts` (a lone batch) its own
        counts are used."""
        output = self.student_output(model, inputs)
        kd, ce = self.distillation(output, inputs)
        counts, ranks = num_items_in_batch, self.accelerator.num_processes
        if not isinstance(counts, StepCounts):
            counts, ranks = StepCounts(inputs["mask"].sum(), (inputs["labels"] >= 0).sum()), 1
        means = torch.stack([kd / counts.kd.clamp_min(1), ce / counts.ce.clamp_min(1)]) * ranks
        # DDP averages the ranks' gradients; times the number of ranks, they add up to the step's sums / counts.
        loss = self.alpha * means[0] + (1 - self.alpha) * means[1]
        if model.training:
            self._logged = self._logged.to(means.device) + means.detach()
        return (loss, output) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``kd`` and ``ce`` (means per position, as ``softcache train``'s metrics) to each training log line."""
        if "loss" in logs and self._logged_steps:
            kd, ce = (self.accelerator.reduce(self._logged, reduction="mean") / self._logged_steps).tolist()
            logs = {**logs, "kd": kd, "ce": ce}
            self._logged, self._logged_steps = torch.zeros_like(self._logged), 0
        super().log(logs, start_time)

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self, eval_dataset: StoreSequences | None = None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``softcache eval``'s metrics of the model on the eval store (each rank evaluates all of it)."""
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(data, StoreSequences):
            raise SoftcacheError("evaluate needs an eval_dataset: a softcache.hf.StoreSequences")
        bf16 = self.args.bf16 and self.args.device.type == "cuda"
        metrics = evaluate(self.model, data.path, data.reader.start, data.reader.start + len(data),
                           batch_size=self.args.per_device_eval_batch_size, device=self.args.device,
                           temperature=self.store.targets.temperature, chunk_tokens=self.distillation.chunk_tokens,
                           autocast_dtype=torch.bfloat16 if bf16 else None)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _tokenizer(given, store: Store, allow_mismatch: bool):
    """The tokenizer saved with the student: ``given`` (checked against the store's) or the store's own."""
    from transformers import AutoTokenizer

    if given is None:
        return AutoTokenizer.from_pretrained(store.tokenizer_path)
    backend = getattr(given, "backend_tokenizer", None)
    if backend is not None and not allow_mismatch and tokenizer_fingerprint(given) != store.tokenizer.fingerprint:
        raise SoftcacheError(f"processing_class is a different tokenizer from the store's teacher ({store.root}); the "
                             "targets' ids would mean other tokens (pass processing_class=None to use the store's, or "
                             "tokenizers=\"trust-ids\")")
    return given


def _check_eval_store(held_out: Store, store: Store) -> None:
    """The held-out store must hold the same teacher's targets: its tokenizer and temperature."""
    differs = None
    if held_out.tokenizer.fingerprint != store.tokenizer.fingerprint:
        differs = "another tokenizer"
    elif held_out.targets.temperature != store.targets.temperature:
        differs = f"temperature {held_out.targets.temperature:g}, not {store.targets.temperature:g}"
    if differs:
        raise SoftcacheError(f"eval_dataset {held_out.root} was written with {differs} (train_dataset {store.root}); "
                             "evaluate on a store written by the same teacher job settings")
