"""The student job: distil a store's cached teacher targets into a student, with no teacher in memory.

Reads top to bottom: open the store and the run directory, build the student and its optimiser,
restore the newest checkpoint when resuming, then loop over optimiser steps (micro-batches from the
store, KD + CE summed and divided by the step's valid-position counts), evaluating, logging and
checkpointing as configured; finally save a ``from_pretrained`` model with the store's tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache import checkpoint
from softcache.config import FUSE_ABOVE_BYTES, RESUMABLE_CHANGES, TrainConfig
from softcache.data import ReaderState, StoreDataset, batches_per_epoch
from softcache.distributed import Ranks, all_sum, barrier, broadcast, on_main, process_group
from softcache.errors import SoftcacheError
from softcache.evaluate import evaluate
from softcache.losses import distillation_loss, linear_distillation_loss, store_tail
from softcache.optim import adamw, warmup_cosine
from softcache.store import open_store
from softcache.store.files import write_json
from softcache.student import Trunk, build_student, check_compatible, fusable, output_vocab, save_student
from softcache.teacher import resolve_device

RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
# The batch tensors a training step moves to its device (a batch also carries target_mask, step and epoch).
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
    when the global batch (batch size x ranks) stays the same.
    """
    config.validate()
    backend = "nccl" if resolve_device(config.device).type == "cuda" else "gloo"
    with process_group(backend) as ranks:
        return _run_train(config, ranks)


def _run_train(config: TrainConfig, ranks: Ranks) -> TrainResult:
    log = (lambda message: _log(config, message)) if ranks.main else (lambda message: None)
    out = Path(config.out)
    device = ranks.device(resolve_device(config.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = open_store(config.store, allow_incomplete=config.allow_incomplete)
    if not store.complete:
        log(f"note: {config.store} is incomplete; training on its {len(store):,} finished sequences")
    store_temperature = store.manifest["targets"]["temperature"]
    temperature = config.temperature or store_temperature
    if temperature != store_temperature:
        log(f"note: the store was written at temperature {store_temperature:g}; the student uses "
            f"{temperature:g} (the KD loss is scaled by T^2 = {temperature ** 2:g})")
    tail = config.tail or store_tail(store.manifest)
    if store.manifest["targets"]["kind"] == "sampled" and tail != "none":
        log(f"note: --tail {tail} on sampled targets: they sum to 1, so there is no tail and "
            "every choice gives the same loss up to rounding")
    train_stop, evaluation = _split(config, len(store))
    if config.eval_store:
        _check_eval_store(config.eval_store, store)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_student(config.student, config.seed)
    check_compatible(model, store, config.student, config.allow_tokenizer_mismatch)
    # Only once every check has passed: a refused run leaves nothing.
    on_main(ranks, lambda: _prepare_run_dir(out, config, store, ranks.world))
    model.to(device).train()
    optimizer = adamw(model, config.lr, config.weight_decay)
    per_epoch = batches_per_epoch(train_stop, config.batch_size * ranks.world)
    total_steps = config.steps or math.ceil(config.epochs_or_one * per_epoch / config.grad_accum)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * total_steps)
    scheduler = warmup_cosine(optimizer, warmup, total_steps, config.min_lr_ratio)

    start_step = 0
    found = broadcast(ranks, checkpoint.latest(out) if config.resume and ranks.main else None)
    if found is not None:
        state = checkpoint.load(found)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"resuming from {found.name} (step {start_step:,} of {total_steps:,})")
    elif config.resume:
        log(f"no checkpoint in {out}; starting from step 0")
    if ranks.main:
        _truncate_metrics(out / METRICS, start_step)
    logits_bytes = 4 * config.batch_size * store.layout.seq_len * output_vocab(model)
    wanted = fuse_wanted(config.fused_linear, device, logits_bytes)
    fused = wanted and fusable(model, torch.from_numpy(store.read_rows([0])["input_ids"]).to(device))
    if wanted and not fused:
        log("note: this student's logits are not a plain linear head on its hidden states; the loss is "
            "computed from the logits")
    trained = Trunk(model) if fused else model
    if ranks.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index]
                                                            if device.type == "cuda" else None)

    global_batch = config.batch_size * ranks.world
    reader = ReaderState(config.seed, global_batch * config.grad_accum, start_step * config.grad_accum)
    dataset = StoreDataset(config.store, config.batch_size, seed=config.seed, stop=train_stop,
                           start_batch=reader.batches_consumed, allow_incomplete=config.allow_incomplete,
                           verify_checksums=config.verify_shards)
    loader = DataLoader(dataset, batch_size=None, num_workers=config.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=config.num_workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))  # keeps the global RNG untouched
    autocast = torch.bfloat16 if device.type == "cuda" else None
    batches = iter(loader)
    bar = _progress(config, total_steps, start_step, disable=not ranks.main)
    started = time.perf_counter()
    final_eval = None
    metrics = open(out / METRICS, "a") if ranks.main else None
    try:
        for step in range(start_step, total_steps):
            step_started = time.perf_counter()
            micro = [next(batches) for _ in range(config.grad_accum)]
            # One averaging rule: sums over the whole step (all micro-batches, all ranks), divided by the
            # step's valid-position counts. DDP averages gradients over ranks, hence the factor world.
            counts = all_sum(ranks, torch.stack([sum(b["mask"].sum() for b in micro),
                                                 sum((b["labels"] >= 0).sum() for b in micro)]).to(device))
            kd_count, ce_count = counts[0].clamp_min(1), counts[1].clamp_min(1)
            kd_total = ce_total = 0.0
            for index, batch in enumerate(micro):
                batch = {name: batch[name].to(device, non_blocking=True) for name in LOSS_INPUTS}
                sync = index == len(micro) - 1 or ranks.world == 1
                targets = (batch["target_ids"], batch["target_logprobs"], batch["mask"], batch["labels"],
                           config.loss, tail, temperature, config.beta, config.chunk_tokens)
                with contextlib.nullcontext() if sync else trained.no_sync():
                    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                        output = trained(input_ids=batch["input_ids"])
                    if fused:
                        kd, ce = linear_distillation_loss(output, model.get_output_embeddings().weight, *targets)
                    else:
                        kd, ce = distillation_loss(output.logits, *targets)
                    loss = (config.alpha * kd / kd_count + (1 - config.alpha) * ce / ce_count) * ranks.world
                    loss.backward()
                kd_total += kd.detach()
                ce_total += ce.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            sums = all_sum(ranks, torch.stack([torch.as_tensor(kd_total, device=device),
                                               torch.as_tensor(ce_total, device=device)]).float())
            kd_mean, ce_mean = (sums[0] / kd_count).item(), (sums[1] / ce_count).item()
            tokens = int(counts[0])
            record = {"step": step + 1, "epoch": int(micro[-1]["epoch"]),
                      "loss": config.alpha * kd_mean + (1 - config.alpha) * ce_mean, "kd": kd_mean, "ce": ce_mean,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "tokens": tokens,
                      "tokens_per_s": tokens / (time.perf_counter() - step_started)}
            done = step + 1 == total_steps
            if evaluation and ranks.main and ((config.eval_every and (step + 1) % config.eval_every == 0) or done):
                record["eval"] = evaluate(model, *evaluation, batch_size=config.batch_size, device=device,
                                          temperature=store_temperature, chunk_tokens=config.chunk_tokens,
                                          autocast_dtype=autocast)
                final_eval = record["eval"] if done else final_eval
            if ranks.main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if ranks.main and ((step + 1) % config.checkpoint_every == 0 or done):
                reader.batches_consumed = (step + 1) * config.grad_accum
                checkpoint.save(out, step + 1, {
                    "step": step + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(), "reader": reader.to_dict(),
                    "world_size": ranks.world,
                })
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
            bar.update(1)
    finally:
        if metrics is not None:
            metrics.close()
    bar.close()
    if ranks.main:
        save_student(model, store, out / "final")
    barrier(ranks)
    return TrainResult(out, total_steps - start_step, final_eval, time.perf_counter() - started)


def fuse_wanted(choice: str, device: torch.device, logits_bytes: int) -> bool:
    """--fused-linear: on, off, or auto (on for CUDA, or above FUSE_ABOVE_BYTES of float32 logits)."""
    return choice == "on" or (choice == "auto" and (device.type == "cuda" or logits_bytes > FUSE_ABOVE_BYTES))


def _prepare_run_dir(out: Path, config: TrainConfig, store, world: int) -> None:
    """Create the run directory and save the resolved configuration; refuse to mix two runs.

    A resumed run may change the number of ranks, and with it --batch-size, as long as the global
    batch (batch size x ranks) stays the same."""
    saved_path = out / RUN_CONFIG
    wanted = {"config": config.to_dict(), "world_size": world,
              "store": {"path": str(store.root), "content_sha256": _content_digest(store)}}
    if saved_path.exists():
        if not config.resume:
            raise SoftcacheError(f"--out {out} already holds a training run; pass --resume to continue it, "
                                 "or choose another directory")
        saved = json.loads(saved_path.read_text())
        differences = [f"{key}: run has {saved['config'].get(key)!r}, now {value!r}"
                       for key, value in wanted["config"].items()
                       if key not in (*RESUMABLE_CHANGES, "batch_size") and saved["config"].get(key) != value]
        saved_world = saved.get("world_size", 1)
        if saved["config"]["batch_size"] * saved_world != config.batch_size * world:
            differences.append(f"global batch (--batch-size x ranks): run has {saved['config']['batch_size']} x "
                               f"{saved_world}, now {config.batch_size} x {world}")
        if saved["store"]["content_sha256"] != wanted["store"]["content_sha256"]:
            differences.append("the store's content differs from the one the run started with")
        if differences:
            raise SoftcacheError(f"--resume with changed settings ({'; '.join(differences)}); "
                                 "resume with the original settings or start a new --out")
    elif out.exists() and any(out.iterdir()):
        raise SoftcacheError(f"--out {out} is not empty and holds no training run; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved_path, wanted)


def _content_digest(store) -> str:
    """The store's content digest; for an unfinished store, that of its finished shards."""
    from softcache.store.writer import store_content_digest

    return store.manifest["totals"]["content_sha256"] if store.complete else store_content_digest(store.shards)


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
    for section, key in (("tokenizer", "fingerprint"), ("targets", "temperature")):
        if held_out.manifest[section][key] != store.manifest[section][key]:
            raise SoftcacheError(f"--eval-store {path} differs from --store in {section}.{key}; "
                                 "evaluate on a store written by the same teacher job settings")
    if held_out.manifest["corpus"]["fingerprint"] == store.manifest["corpus"]["fingerprint"]:
        print(f"warning: --eval-store {path} has the same corpus as --store; it is not held out", file=sys.stderr)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines a killed run wrote after the checkpoint it is resumed from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _log(config: TrainConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def _progress(config: TrainConfig, total: int, start: int, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="student", disable=disable or not config.progress,
                file=sys.stderr, dynamic_ncols=True)
