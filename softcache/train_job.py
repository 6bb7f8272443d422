"""The student job: distil a store's cached teacher targets into a student, with no teacher in memory.

:class:`StudentJob` is a recipe of named steps, each small enough to replace on its own (a Hugging
Face Trainer adapter drives ``train_step``'s pieces itself; a LoRA student changes ``setup_model``,
``restore``, ``checkpoint`` and ``save`` by one call each into softcache.lora; an FSDP student,
softcache.fsdp, replaces the steps that see the whole model, ``distribute``, ``evaluate``,
``restore``, ``checkpoint`` and ``save``, and the ``gradient_sync`` and ``clip_gradients`` hooks of
``train_step``):

    setup_store      open the store, resolve temperature and tail, split off evaluation data
    setup_model      build and check the student (and its LoRA adapter), prepare the run directory
    setup_forward    choose the fused loss; ``distribute`` the student over the ranks (DDP)
    setup_optimizer  AdamW and its warm-up/cosine schedule over the run's steps (of the distributed
                     student's parameters: FSDP replaces them with shards)
    restore          continue from the newest checkpoint (--resume)
    setup_tracker    the --report-to tracker, continuing its run on a resume
    setup_data       the store's batches from the resume point on
    train_step       one optimiser step: micro-batches, KD + CE summed and divided by the step's counts
    evaluate         held-out metrics
    checkpoint       model (or adapter), optimiser, schedule, RNG and reader state, atomically
    save             a ``from_pretrained`` model (or adapter) with the store's tokenizer

``run()`` calls them in that order and loops ``train_step`` with evaluation, metrics and
checkpoints as configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache import checkpoint, lock, lora
from softcache.config import FUSE_ABOVE_BYTES, RESUMABLE_CHANGES, TrainConfig
from softcache.cross_data import CROSS_INPUTS, ViewDataset
from softcache.cross_losses import CrossTokenizerLoss
from softcache.data import ReaderState, StoreDataset, batches_per_epoch
from softcache.distributed import Ranks, all_sum, barrier, broadcast, on_main, process_group
from softcache.errors import Interrupted, SoftcacheError, one_line
from softcache.evaluate import evaluate
from softcache.logs import note, notes
from softcache.losses import DistillationLoss, Projected
from softcache.models import output_vocab, resolve_device
from softcache.optim import adamw, warmup_cosine
from softcache.packing import forward_documents, uses_varlen
from softcache.store import open_store
from softcache.store.files import atomic_file, write_json
from softcache.student import (Trunk, build_student, check_compatible, find_student, fusable, save_student,
                               student_tokenizer)
from softcache.trackers import NoTracker, open_tracker
from softcache.view import View, open_view

log = logging.getLogger(__name__)
RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
RUN_LOCK = "run.lock"  # names the process training into the run directory (softcache.lock)
# The batch tensors a training step moves to its device (a batch also carries target_mask, step and epoch),
# and segments when the store packs documents.
LOSS_INPUTS = ("input_ids", "target_ids", "target_logprobs", "mask", "labels")


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_eval: dict | None
    seconds: float

    def summary(self) -> str:
        text = f"trained {self.steps:,} steps in {self.seconds:.1f} s; model saved to {self.out / 'final'}"
        if self.final_eval:
            e = self.final_eval
            text += (f"; held-out CE {e['ce']:.4f} (perplexity {e['perplexity']:.2f}), KL to teacher {e['kl']:.4f}, "
                     f"top-1 agreement {e['top1_agreement']:.3f}")
        return text


def run_train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the student job described by ``config``.

    Under ``torchrun --nproc-per-node N`` it trains with DistributedDataParallel (gloo on CPU, NCCL on
    CUDA): every rank reads its part of each global batch (``--batch-size`` sequences per rank), the
    losses are divided by the valid-position counts of the whole step on all ranks, and rank 0
    writes the metrics, checkpoints and final model. A run can resume on another number of ranks
    when the global batch (batch size x ranks) stays the same. With ``config.fsdp`` the student is
    sharded with FSDP2 instead (softcache.fsdp), also on one process.
    """
    config.validate()
    backend = "nccl" if resolve_device(config.device).type == "cuda" else "gloo"
    if config.fsdp_cpu_offload and backend == "nccl":  # offloaded shards meet in CPU collectives (the gradient norm)
        backend = "cuda:nccl,cpu:gloo"
    # FSDP shards over a process group, a group of one outside torchrun (softcache.fsdp says why).
    with process_group(backend, alone=config.fsdp) as ranks, notes(config.progress):
        if config.fsdp:
            from softcache.fsdp import FSDPStudentJob  # imports torch.distributed's FSDP only when asked

            return FSDPStudentJob(config, ranks).run()
        return StudentJob(config, ranks).run()


class StudentJob:
    """The student job's state and steps; see the module docstring for the order."""

    sharded = False
    """Whether the model is sharded over the ranks, so that evaluation, checkpoints and the final save
    need every rank (FSDP); otherwise rank 0 does them alone."""

    def __init__(self, config: TrainConfig, ranks: Ranks = Ranks()):
        self.config = config
        self.ranks = ranks
        self.out = Path(config.out)
        self.device = ranks.device(resolve_device(config.device))
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.step = 0
        """Optimiser steps done (restored on resume)."""
        self.checkpointed: int | None = None
        """The step of the newest checkpoint of this run, once there is one."""
        self.tracker = NoTracker()
        self.adapter = None
        """peft's wrapper of the student when it trains a LoRA adapter (--lora-r), else None."""
        self.frozen_sha256: str | None = None
        """With an adapter: the sha256 of the student's frozen weights (softcache.lora.frozen_sha256)."""
        self.view: View | None = None
        """The store in the student's tokens, for a student with another tokenizer (--tokenizers cross)."""

    # ---- set-up steps --------------------------------------------------------------------------

    def setup_store(self) -> None:
        """Open the store; resolve the loss's temperature and tail; split off the evaluation data."""
        config = self.config
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.store = open_store(config.store, allow_incomplete=config.allow_incomplete,
                                verify_checksums=config.verify_shards)
        self.store.check_tokenizer()  # final/ carries it: a damaged one fails now, not after training
        if not self.store.complete:
            note(self.ranks, f"note: {config.store} is incomplete; training on its {len(self.store):,} finished sequences")
        targets = self.store.targets
        temperature = config.temperature or targets.temperature
        if temperature != targets.temperature:
            note(self.ranks, f"note: the store was written at temperature {targets.temperature:g}; the student uses "
                             f"{temperature:g} (the KD loss is scaled by T^2 = {temperature ** 2:g})")
        tail = config.tail or targets.spec.default_tail
        if targets.spec.default_tail == "none" and tail != "none":
            note(self.ranks, f"note: --tail {tail} on {targets.kind} targets: they sum to 1, so there is no tail and "
                             "every choice gives the same loss up to rounding")
        if config.tokenizers == "cross":
            self.loss = CrossTokenizerLoss(config.cross_loss, temperature, config.chunk_tokens)
        else:
            self.loss = DistillationLoss(config.loss, tail, temperature, config.beta, config.chunk_tokens)
        self.train_stop, self.evaluation = _split(config, len(self.store))
        if config.eval_store:
            _check_eval_store(config.eval_store, self.store)

    def setup_model(self) -> None:
        """Build the student (seeded, in --student-dtype), check it against the store, freeze it under a
        LoRA adapter when asked, and prepare the run directory."""
        config = self.config
        if not config.progress:  # transformers' own bars (saving the final model) obey --no-progress too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.model = build_student(config.student, config.seed, dtype=getattr(torch, config.student_dtype))
        self.view = self.open_view() if config.tokenizers == "cross" else None
        check_compatible(self.model, self.store, config.student, config.tokenizers, view=self.view)
        if config.lora_r:
            self.adapter = lora.attach(self.model, lora.LoraSettings.of(config), find_student(config.student))
            self.frozen_sha256 = lora.frozen_sha256(self.model)  # a resume must find the same frozen weights
        # Only once every check has passed: a refused run leaves nothing.
        on_main(self.ranks, lambda: _prepare_run_dir(self.out, config, self.store, self.ranks.world))
        self.model.to(self.device).train()
        if self.autocast is not None:  # mixed precision: the weights that train stay float32 (master weights)
            for parameter in self.model.parameters():
                if parameter.requires_grad and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()

    def open_view(self) -> View:
        """The store in the student's tokens (--view): rank 0 builds it when it is not there yet."""
        config = self.config
        tokenizer = student_tokenizer(config.student)
        on_main(self.ranks, lambda: open_view(config.view, self.store, tokenizer, f"--student {config.student}",
                                              progress=config.progress, verify=False))
        view = open_view(config.view, self.store, tokenizer, f"--student {config.student}",
                         verify=config.verify_shards)
        note(self.ranks, f"--view {config.view}: {view.counts.describe()}")
        return view

    def setup_optimizer(self) -> None:
        """AdamW and the warm-up/cosine schedule over the run's optimiser steps."""
        config = self.config
        self.optimizer = adamw(self.model, config.lr, config.weight_decay)
        per_epoch = batches_per_epoch(self.train_stop, config.batch_size * self.ranks.world)
        self.total_steps = config.steps or math.ceil(config.epochs_or_one * per_epoch / config.grad_accum)
        warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * self.total_steps)
        self.scheduler = warmup_cosine(self.optimizer, warmup, self.total_steps, config.min_lr_ratio)

    def restore(self) -> None:
        """With --resume, load the newest checkpoint (model, optimiser, schedule, RNG, step); drop metric
        lines written after it."""
        found = broadcast(self.ranks, checkpoint.latest(self.out) if self.config.resume and self.ranks.main else None)
        if found is not None:
            state = checkpoint.load(found)
            if self.adapter is not None and state.get("frozen_sha256") != self.frozen_sha256:
                raise SoftcacheError(f"checkpoint {found} was trained on other frozen weights than --student "
                                     f"{self.config.student} holds now (changed in place, or a newer snapshot in the "
                                     "Hugging Face cache?); resume with the original student, or start a new --out")
            try:
                if self.adapter is not None:
                    lora.load_adapter_state(self.model, state["model"])
                else:
                    self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                checkpoint.set_rng_state(state["rng"])
            except Exception as err:  # torch's loaders raise many types for a state of another shape
                raise SoftcacheError(f"checkpoint {found} does not fit this run's student or optimiser "
                                     f"({one_line(err)}); was --student changed in place? Resume with the "
                                     "original student, or start a new --out") from err
            self.step = self.checkpointed = state["step"]
            note(self.ranks, f"resuming from {found.name} (step {self.step:,} of {self.total_steps:,})")
        elif self.config.resume:
            note(self.ranks, f"no checkpoint in {self.out}; starting from step 0")
        if self.ranks.main:
            _truncate_metrics(self.out / METRICS, self.step)

    def setup_forward(self) -> None:
        """Fuse the loss with the output projection when wanted and possible; distribute the student."""
        config = self.config
        logits_bytes = 4 * config.batch_size * self.store.layout.seq_len * output_vocab(self.model)
        wanted = fuse_wanted(config.fused_linear, self.device, logits_bytes) and self.view is None
        sample = torch.from_numpy(self.store.read_rows([0])["input_ids"]).to(self.device)
        self.fused = wanted and fusable(self.model, sample)
        if wanted and not self.fused:
            note(self.ranks, "note: this student's logits are not a plain linear head on its hidden states; the loss "
                             "is computed from the logits")
        self.trained = self.distribute(Trunk(self.model) if self.fused else self.model)

    def distribute(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (the student, or its Trunk) as the ranks train it: DistributedDataParallel on several."""
        if self.ranks.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def setup_tracker(self) -> None:
        """The --report-to tracker (rank 0), continuing its run from the resumed step."""
        if self.ranks.main:
            self.tracker = open_tracker(self.config.report_to, self.out, self.step, self.config.to_dict())

    def setup_data(self) -> None:
        """The store's batches from the resume point on (deterministic in seed and global batch)."""
        config = self.config
        global_batch = config.batch_size * self.ranks.world
        self.reader = ReaderState(config.seed, global_batch * config.grad_accum, self.step * config.grad_accum)
        options = dict(seed=config.seed, stop=self.train_stop, start_batch=self.reader.batches_consumed,
                       allow_incomplete=config.allow_incomplete, verify_checksums=config.verify_shards)
        if self.view is not None:
            dataset = ViewDataset(config.store, config.view, config.batch_size, config.cross_loss, verify_view=False,
                                  **options)
        else:
            dataset = StoreDataset(config.store, config.batch_size, **options)
        loader = DataLoader(dataset, batch_size=None, num_workers=config.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=config.num_workers > 0,
                            worker_init_fn=_ignore_interrupts,
                            generator=torch.Generator().manual_seed(config.seed))  # keeps the global RNG untouched
        self.batches = iter(loader)

    # ---- the loop's steps ----------------------------------------------------------------------

    def forward(self, batch: dict):
        """The student's output for the loss: logits, or hidden states and head weight when fused."""
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if "segments" in batch:  # packed documents: each seen alone, as the teacher saw it
                output = forward_documents(self.trained, batch["input_ids"], batch["segments"], uses_varlen(self.model))
            else:
                output = self.trained(input_ids=batch["input_ids"])
        if self.fused:
            return Projected(output, self.model.get_output_embeddings().weight)
        return output.logits

    def gradient_sync(self, sync: bool):
        """The context of one micro-batch's forward and backward: the gradients are reduced over the
        ranks only when ``sync`` (the step's last micro-batch); DDP's no_sync for the others."""
        return contextlib.nullcontext() if sync or self.ranks.world == 1 else self.trained.no_sync()

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to --clip-grad (0: no clipping); return their norm before clipping, 0-d."""
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad or float("inf"))

    def _next_batch(self) -> dict:
        """The reader's next micro-batch. A Ctrl-C while it arrives takes effect once it has: a worker
        handing its tensors over prints a traceback of its own if the main process stops halfway."""
        with _interrupts_held():
            return next(self.batches)

    def train_step(self) -> dict:
        """One optimiser step over ``--grad-accum`` micro-batches; returns its metrics record."""
        config, ranks = self.config, self.ranks
        started = time.perf_counter()
        micro = [self._next_batch() for _ in range(config.grad_accum)]
        # One averaging rule: sums over the whole step (all micro-batches, all ranks), divided by the
        # step's valid-position counts. DDP and FSDP average gradients over ranks, hence the factor world.
        counts = all_sum(ranks, torch.stack([sum(b["mask"].sum() for b in micro),
                                             sum((b["labels"] >= 0).sum() for b in micro)]).to(self.device))
        kd_count, ce_count = counts[0].clamp_min(1), counts[1].clamp_min(1)
        kd_total = ce_total = 0.0
        for index, batch in enumerate(micro):
            batch = {name: batch[name].to(self.device, non_blocking=True)
                     for name in LOSS_INPUTS + CROSS_INPUTS + ("segments",)
                     if name in batch}
            with self.gradient_sync(index == len(micro) - 1):
                kd, ce = self.loss(self.forward(batch), batch)
                loss = (config.alpha * kd / kd_count + (1 - config.alpha) * ce / ce_count) * ranks.world
                loss.backward()
            kd_total += kd.detach()
            ce_total += ce.detach()
        grad_norm = self.clip_gradients()
        health = torch.stack([torch.as_tensor(x, device=self.device).float() for x in (kd_total, ce_total, grad_norm)])
        if not bool(torch.isfinite(health).all()):  # before the weights change: the last checkpoint stays good
            kd, ce, norm = health.tolist()
            raise SoftcacheError(f"step {self.step + 1}: the loss or the gradient norm is not finite (KD sum {kd}, CE sum "
                                 f"{ce}, gradient norm {norm}); stopped before the optimiser step. Lower --lr or "
                                 "--temperature, or check the store with softcache verify; --resume continues from "
                                 "the last checkpoint")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        sums = all_sum(ranks, torch.stack([torch.as_tensor(kd_total, device=self.device),
                                           torch.as_tensor(ce_total, device=self.device)]).float())
        kd_mean, ce_mean = (sums[0] / kd_count).item(), (sums[1] / ce_count).item()
        tokens = int(counts[0])
        return {"step": self.step, "epoch": int(micro[-1]["epoch"]),
                "loss": config.alpha * kd_mean + (1 - config.alpha) * ce_mean, "kd": kd_mean, "ce": ce_mean,
                "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens": tokens,
                "tokens_per_s": tokens / (time.perf_counter() - started)}

    def evaluate(self) -> dict:
        """Held-out metrics of the current model (softcache.evaluate) at the store's temperature."""
        return evaluate(self.model, *self.evaluation, batch_size=self.config.batch_size, device=self.device,
                        temperature=self.store.targets.temperature, chunk_tokens=self.config.chunk_tokens,
                        autocast_dtype=self.autocast, view=self.config.view)

    def checkpoint(self) -> None:
        """Everything a resumed run needs to continue exactly, written atomically (rank 0)."""
        self.reader.batches_consumed = self.step * self.config.grad_accum
        # A LoRA student's checkpoint holds the adapter alone: the frozen weights are --student's, checked on resume.
        model = self.model.state_dict() if self.adapter is None else lora.adapter_state(self.model)
        state = {"step": self.step, "model": model, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state(),
                 "reader": self.reader.to_dict(), "world_size": self.ranks.world}
        if self.adapter is not None:
            state["frozen_sha256"] = self.frozen_sha256
        checkpoint.save(self.out, self.step, state)
        self.checkpointed = self.step

    def save(self) -> None:
        """``save_pretrained`` into OUT/final with the tokenizer the student reads (rank 0); for a LoRA student the
        adapter, and with --merge-lora the merged student in OUT/final/merged."""
        if self.adapter is not None:
            lora.save_adapter(self.adapter, self.tokenizer_source, self.out / "final", merge=self.config.merge_lora)
        else:
            save_student(self.model, self.tokenizer_source, self.out / "final")

    @property
    def tokenizer_source(self):
        """Where the tokenizer saved with the student comes from: the store, or the view of a student with
        another tokenizer (its own); either has ``tokenizer_path``."""
        return self.view if self.view is not None else self.store

    # ---- the recipe ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        except KeyboardInterrupt:
            raise Interrupted(self._interrupted()) from None
        finally:
            self.tracker.close()
            if self.ranks.main:
                lock.release(self.out / RUN_LOCK)  # a killed run's lock is taken over by the next one

    def _interrupted(self) -> str:
        """Where an interrupted run stopped and how it goes on."""
        where = f"interrupted at step {self.step:,}" + (f" of {self.total_steps:,}" if hasattr(self, "total_steps") else "")
        if self.checkpointed is None:
            return f"{where}, before the first checkpoint; rerun with --resume to start again from step 0"
        return f"{where}; rerun with --resume to continue from the checkpoint of step {self.checkpointed:,}"

    def _run(self) -> TrainResult:
        config, main = self.config, self.ranks.main
        self.setup_store()
        self.setup_model()
        self.setup_forward()
        self.setup_optimizer()
        self.restore()
        self.setup_tracker()
        self.setup_data()
        start_step = self.step
        started = time.perf_counter()
        final_eval = None
        works = main or self.sharded  # whether this rank takes part in evaluation, checkpoints and the save
        with _progress(config, self.total_steps, start_step, disable=not main) as bar:
            while self.step < self.total_steps:
                record = self.train_step()
                done = self.step == self.total_steps
                if self.evaluation and works and ((config.eval_every and self.step % config.eval_every == 0) or done):
                    record["eval"] = self.evaluate()
                    final_eval = record["eval"] if done else final_eval
                if main:
                    _append_metrics(self.out / METRICS, record)
                    self.tracker.log(record)
                if works and (self.step % config.checkpoint_every == 0 or done):
                    with _interrupts_held():  # a first Ctrl-C waits for the checkpoint to be whole
                        self.checkpoint()
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                bar.update(1)
        if works:
            self.save()
        barrier(self.ranks)
        return TrainResult(self.out, self.total_steps - start_step, final_eval, time.perf_counter() - started)


def fuse_wanted(choice: str, device: torch.device, logits_bytes: int) -> bool:
    """--fused-linear: on, off, or auto (on for CUDA, or above FUSE_ABOVE_BYTES of float32 logits)."""
    return choice == "on" or (choice == "auto" and (device.type == "cuda" or logits_bytes > FUSE_ABOVE_BYTES))


def _prepare_run_dir(out: Path, config: TrainConfig, store, world: int) -> None:
    """Create and lock the run directory and save the resolved configuration; refuse to mix two runs.

    A resumed run may change the number of ranks, and with it --batch-size, as long as the global
    batch (batch size x ranks) stays the same."""
    saved_path = out / RUN_CONFIG
    wanted = {"config": config.to_dict(), "world_size": world,
              "store": {"path": str(store.root), "content_sha256": _content_digest(store)}}
    if saved_path.exists():
        if not config.resume:
            raise SoftcacheError(f"--out {out} already holds a training run; pass --resume to continue it, "
                                 "or choose another directory")
        saved = _read_run_record(saved_path)
        # A setting added after the run started is taken at its default, which keeps the old behaviour.
        defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
        before = {**defaults, **saved["config"]}
        differences = [f"{key}: run has {before[key]!r}, now {value!r}" for key, value in wanted["config"].items()
                       if key not in (*RESUMABLE_CHANGES, "batch_size") and before[key] != value]
        saved_world = saved.get("world_size", 1)
        if saved["config"]["batch_size"] * saved_world != config.batch_size * world:
            differences.append(f"global batch (--batch-size x ranks): run has {saved['config']['batch_size']} x "
                               f"{saved_world}, now {config.batch_size} x {world}")
        if saved["store"]["content_sha256"] != wanted["store"]["content_sha256"]:
            differences.append("the store's content differs from the one the run started with")
        if differences:
            raise SoftcacheError(f"--resume with changed settings ({'; '.join(differences)}); "
                                 "resume with the original settings or start a new --out")
    elif out.exists() and any(p.name != RUN_LOCK for p in out.iterdir()):
        raise SoftcacheError(f"--out {out} is not empty and holds no training run; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    lock.take(out / RUN_LOCK, f"--out {out}", "being trained into by another softcache train run")
    try:
        write_json(saved_path, wanted)
    except OSError as err:
        raise SoftcacheError(f"could not write {saved_path} ({err.strerror or err}); free space or fix the "
                             "problem, or choose another --out") from err


def _read_run_record(path: Path) -> dict:
    """The run's config.json as :func:`_prepare_run_dir` wrote it, checked: a mapping holding the
    config (with its batch size), the store's content digest and the number of ranks."""
    problem = None
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"not valid JSON: {one_line(err)}"
    else:
        if not isinstance(saved, dict):
            problem = f"a {type(saved).__name__}, not a mapping"
        elif not isinstance(saved.get("config"), dict) or not _is_count(saved["config"].get("batch_size")):
            problem = "no config with a batch_size"
        elif not isinstance(saved.get("store"), dict) or not isinstance(saved["store"].get("content_sha256"), str):
            problem = "no store content_sha256"
        elif not _is_count(saved.get("world_size", 1)):
            problem = f"world_size {saved['world_size']!r} is not a positive integer"
    if problem is not None:
        raise SoftcacheError(f"{path} is not a softcache run record ({problem}); the run directory is damaged: "
                             "restore the file, or start a new --out")
    return saved


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _content_digest(store) -> str:
    """The store's content digest; for an unfinished store, that of its finished shards."""
    from softcache.store.consistency import store_content_digest

    return store.totals.content_sha256 if store.complete else store_content_digest(store.shards)


def _split(config: TrainConfig, n: int) -> tuple[int, tuple | None]:
    """Training sequences [0, stop) and the evaluation set as (store, start, stop), or None."""
    if config.eval_store:
        return n, (config.eval_store, 0, None)  # checked against the training store in _check_eval_store
    if config.eval_fraction:
        held_out = max(1, round(n * config.eval_fraction))
        if held_out >= n:
            raise SoftcacheError(f"--eval-fraction {config.eval_fraction} leaves no training sequences in {n}")
        return n - held_out, (config.store, n - held_out, n)
    return n, None


def _check_eval_store(path: str, store) -> None:
    held_out = open_store(path)
    for what, mine, theirs in (("tokenizer.fingerprint", store.tokenizer.fingerprint, held_out.tokenizer.fingerprint),
                               ("targets.temperature", store.targets.temperature, held_out.targets.temperature)):
        if mine != theirs:
            raise SoftcacheError(f"--eval-store {path} differs from --store in {what}; "
                                 "evaluate on a store written by the same teacher job settings")
    if held_out.corpus.fingerprint == store.corpus.fingerprint:
        log.warning(f"warning: --eval-store {path} has the same corpus as --store; it is not held out")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines a killed run wrote after the checkpoint it is resumed from, and a last line a
    crash cut short while it was written. Any other line that is not a metrics record is refused."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _metrics_record(line)
        if record is None:
            if number == len(lines):  # the last line, not ended by a newline: a write cut short
                continue
            raise SoftcacheError(f"{path} line {number} is not a metrics record (a JSON object with a step); the "
                                 "file is damaged: delete that line and rerun with --resume")
        if record["step"] <= step:
            kept.append(line + b"\n")
    with atomic_file(path) as handle:
        handle.write(b"".join(kept))


def _metrics_record(line: bytes) -> dict | None:
    """One line of metrics.jsonl as its record, or None when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def _append_metrics(path: Path, record: dict) -> None:
    """Append ``record`` to metrics.jsonl; opened per record, so a failed write leaves at most a torn
    last line (dropped on --resume) and nothing buffered to fail again."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as err:
        raise SoftcacheError(f"could not append to {path} ({err.strerror or err}); the checkpoints are kept: "
                             "free space or fix the problem and rerun with --resume") from err


@contextlib.contextmanager
def _interrupts_held():
    """Inside the block a first Ctrl-C (SIGINT) is held, and raised as KeyboardInterrupt when the block
    ends; a second one is raised at once (a reader that never answers can still be stopped)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops them; otherwise each would print
    its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _progress(config: TrainConfig, total: int, start: int, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="student", disable=disable or not config.progress,
                file=sys.stderr, dynamic_ncols=True)
