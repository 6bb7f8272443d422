"""Benchmark: a KD-from-store training step vs a plain cross-entropy step, and the reader's throughput.

Same student (benchmarks/configs/student-30m.json, vocab 49,152), same batches from the same store
(top-64 targets of SmolLM2-135M-Instruct), same optimiser. Each round runs ``--steps`` steps of each
mode back to back:
  ce -- input_ids from the store, ``model(input_ids, labels=labels).loss`` (what a user runs without
        softcache), backward, AdamW step;
  kd -- the full batch from the store, the student job's loss (``DistillationLoss``: forward KL, tail
        bucket) with alpha 0.5, backward, AdamW step;
  job -- ``StudentJob.train_step``, the optimiser step ``softcache train`` runs (the same loss, plus the
        step's valid-position counts, gradient clipping and the learning-rate schedule);
  lora-ce, lora-kd, lora-job -- the same three on the same student with its weights frozen under LoRA
        adapters (``--lora-r``, default 16, alpha 32, every linear layer but the head; softcache.lora),
        the student's random-init weights saved once as a model directory (an adapter needs weights).
Medians over rounds of the per-round mean step time; ratios are medians of the per-round ratios to
the CE step of the same parameterisation (full or LoRA) and to the full CE step. Then what each job
keeps: trainable parameters, optimiser state and the checkpoint file ``softcache train`` writes. Then
the reader alone: StoreDataset batches per second for each format and DataLoader worker count, in
tokens/s, against what the KD step consumes.

    python benchmarks/cache_job.py     # first: writes the store this benchmark reads
    python benchmarks/train_step.py

Writes benchmarks/results/train_step.md (and .json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from softcache.data import StoreDataset
from softcache.config import TrainConfig
from softcache import lora
from softcache.losses import DistillationLoss
from softcache.optim import adamw
from softcache.store import open_store
from softcache.student import build_student, find_student
from softcache.train_job import StudentJob

HERE = Path(__file__).parent


def batches(store: str, batch_size: int, workers: int = 0):
    dataset = StoreDataset(store, batch_size, seed=0)
    return iter(DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0))


def ce_step(model, optimizer, batch) -> None:
    loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


KD_LOSS = DistillationLoss("fkl", "bucket")


def kd_step(model, optimizer, batch) -> None:
    kd, ce = KD_LOSS(model(input_ids=batch["input_ids"]).logits, batch)
    (0.5 * kd / batch["mask"].sum().clamp_min(1) + 0.5 * ce / (batch["labels"] >= 0).sum().clamp_min(1)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def student_job(args, run_dir: Path, student: str | None = None, lora_r: int = 0) -> StudentJob:
    """The student job set up to its first step (same store, student, seed, batch and optimiser as above)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(store=args.store, student=student or args.student, out=str(run_dir), steps=10**6,
                         batch_size=args.batch_size, lr=1e-4, weight_decay=0.1, checkpoint_every=10**6, num_workers=0,
                         fused_linear="off", device="cpu", progress=False, lora_r=lora_r)
    job = StudentJob(config)
    for step in (job.setup_store, job.setup_model, job.setup_forward, job.setup_optimizer, job.restore, job.setup_data):
        step()
    return job


def job_step(job: StudentJob, optimizer, batch) -> None:
    job.train_step()  # reads its own batch from the job's loader


def saved_student(config: str, directory: Path) -> str:
    """The random-init student of ``config`` (seed 0) saved as a model directory: what LoRA needs."""
    if not (directory / "model.safetensors").exists():
        build_student(config, seed=0).save_pretrained(directory)
    return str(directory)


def lora_student(directory: str, r: int):
    """The saved student, frozen under adapters of rank ``r`` as ``softcache train --lora-r`` puts them."""
    model = build_student(directory, seed=0)
    lora.attach(model, lora.LoraSettings(r, 2.0 * r, 0.0, "all-linear"), find_student(directory))
    return model


def kept(job: StudentJob) -> dict:
    """What a job keeps besides activations: trainable parameters, optimiser state, one checkpoint."""
    state = sum(t.numel() * t.element_size() for s in job.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    job.checkpoint()
    (path,) = (job.out / "checkpoints").glob("step-*.pt")
    return {"parameters": sum(p.numel() for p in job.model.parameters()),
            "trainable": sum(p.numel() for p in job.model.parameters() if p.requires_grad),
            "optimizer_bytes": state, "checkpoint_bytes": path.stat().st_size}


def timed_steps(step, model, optimizer, stream, steps: int) -> float:
    """Mean seconds per step, data loading included."""
    started = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, next(stream))
    return (time.perf_counter() - started) / steps


def reader_throughput(store: str, batch_size: int, workers: int, batches_to_read: int) -> float:
    stream = batches(store, batch_size, workers)
    next(stream)  # worker start-up is not throughput
    started = time.perf_counter()
    tokens = sum(int(batch["mask"].sum()) for batch in itertools.islice(stream, batches_to_read))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(HERE / "out" / "job-zarr"))
    parser.add_argument("--arrow-store", default=str(HERE / "out" / "job-arrow"))
    parser.add_argument("--student", default=str(HERE / "configs" / "student-30m.json"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA modes' adapters; 0 leaves them out")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()

    store = open_store(args.store)
    seq_len, k = store.layout.seq_len, store.k
    models = {mode: build_student(args.student, seed=0) for mode in ("ce", "kd")}
    jobs = {"job": student_job(args, HERE / "out" / "train_step_job")}
    if args.lora_r:
        weights = saved_student(args.student, HERE / "out" / "train_step_student")
        models.update({mode: lora_student(weights, args.lora_r) for mode in ("lora-ce", "lora-kd")})
        jobs["lora-job"] = student_job(args, HERE / "out" / "train_step_lora_job", weights, args.lora_r)
    optimizers = {mode: adamw(model, 1e-4, 0.1) for mode, model in models.items()}
    streams = {mode: batches(args.store, args.batch_size) for mode in models}  # same seed: same batches
    for mode, job in jobs.items():
        models[mode], optimizers[mode], streams[mode] = job, job.optimizer, itertools.repeat(None)
    steps = {mode: ce_step if mode.endswith("ce") else kd_step if mode.endswith("kd") else job_step for mode in models}
    order = [mode for mode in ("ce", "kd", "job", "lora-ce", "lora-kd", "lora-job") if mode in models]
    for mode in order:  # warm-up
        timed_steps(steps[mode], models[mode], optimizers[mode], streams[mode], 1)
    seconds = {mode: [] for mode in order}
    for round_ in range(args.rounds):
        for mode in order:
            seconds[mode].append(timed_steps(steps[mode], models[mode], optimizers[mode], streams[mode], args.steps))
        print(f"round {round_ + 1}: " + ", ".join(f"{m} {s[-1]:.3f} s/step" for m, s in seconds.items()), flush=True)

    def ratio_of(mode: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(seconds[mode], seconds[base]))

    ratio, job_ratio = ratio_of("kd", "ce"), ratio_of("job", "ce")
    ratios = {mode: {"to_own_ce": ratio_of(mode, "lora-ce" if mode.startswith("lora") else "ce"),
                     "to_full_ce": ratio_of(mode, "ce")} for mode in order}
    tokens_per_step = args.batch_size * seq_len
    consumed = tokens_per_step / statistics.median(seconds["kd"])

    readers = []
    for format_name, path in (("zarr", args.store), ("arrow", args.arrow_store)):
        if not Path(path).exists():
            print(f"skipping {format_name}: {path} does not exist (run benchmarks/cache_job.py)")
            continue
        for workers in (0, 1, 2):
            rate = reader_throughput(path, args.batch_size, workers, batches_to_read=64)
            readers.append({"format": format_name, "workers": workers, "tokens_per_s": rate,
                            "multiple_of_student": rate / consumed})
            print(readers[-1], flush=True)

    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "student": args.student, "parameters": sum(p.numel() for p in models["kd"].parameters()),
        "vocab": models["kd"].config.vocab_size, "k": k, "seq_len": seq_len, "batch_size": args.batch_size,
        "steps_per_round": args.steps, "rounds": args.rounds, "seconds_per_step": seconds,
        "median_seconds_per_step": {m: statistics.median(s) for m, s in seconds.items()},
        "median_ratio_kd_to_ce": ratio, "median_ratio_job_to_ce": job_ratio, "median_ratios": ratios,
        "lora_r": args.lora_r, "kept": {mode: kept(job) for mode, job in jobs.items()},
        "student_tokens_per_s": consumed, "readers": readers,
        "encoding": {"ids": store.encoding.ids, "values": store.encoding.values},
    }
    write_report(results, Path(args.results))


STEPS = {
    "ce": "plain CE (`model(..., labels=...).loss`)",
    "kd": "KD from store (fkl, tail bucket, alpha 0.5)",
    "job": "`StudentJob.train_step` (the same loss, counts, clipping, schedule)",
    "lora-ce": "LoRA: plain CE",
    "lora-kd": "LoRA: KD from store",
    "lora-job": "LoRA: `StudentJob.train_step` (`--lora-r`)",
}


def step_ratios(results: dict) -> dict:
    """Each mode's ratios (older result files have only the KD and job ratios to CE)."""
    if "median_ratios" in results:
        return results["median_ratios"]
    ratios = {"ce": 1.0, "kd": results["median_ratio_kd_to_ce"], "job": results.get("median_ratio_job_to_ce")}
    return {mode: {"to_own_ce": r, "to_full_ce": r} for mode, r in ratios.items() if r is not None}


def kept_table(results: dict) -> list[str]:
    if not results.get("kept"):
        return []
    lines = [f"What `softcache train` keeps besides activations (LoRA rank {results['lora_r']}, alpha "
             f"{2 * results['lora_r']}, every linear layer but the head):", "",
             "| job | trainable parameters | optimiser state | checkpoint file |", "| --- | ---: | ---: | ---: |"]
    for mode, kept in results["kept"].items():
        lines.append(f"| {'LoRA' if mode.startswith('lora') else 'full'} | {kept['trainable'] / 1e6:.2f} M of "
                     f"{kept['parameters'] / 1e6:.2f} M | {kept['optimizer_bytes'] / 2**20:.1f} MiB | "
                     f"{kept['checkpoint_bytes'] / 2**20:.1f} MiB |")
    return lines + [""]


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(results, indent=2) + "\n")
    med = results["median_seconds_per_step"]
    lines = [
        "# KD-from-store training step vs plain CE step",
        "",
        f"Student {Path(results['student']).name} ({results['parameters'] / 1e6:.1f} M parameters, vocab "
        f"{results['vocab']:,}), batch {results['batch_size']} x {results['seq_len']} tokens, top-{results['k']} "
        f"targets (ids {results['encoding']['ids']}, values {results['encoding']['values']}), on CPU ({results['machine']}); {results['rounds']} interleaved rounds of "
        f"{results['steps_per_round']} steps, medians. Produced by `python benchmarks/train_step.py`.",
        "",
        "| step | median s/step | ratio to CE of the same parameters | ratio to full CE |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {STEPS[mode]} | {med[mode]:.3f} | {ratio['to_own_ce']:.3f} | {ratio['to_full_ce']:.3f} |"
          for mode, ratio in step_ratios(results).items()],
        "",
        *kept_table(results),
        f"The KD student consumes {results['student_tokens_per_s']:,.0f} tokens/s.",
        "",
        "| reader | DataLoader workers | tokens/s | multiple of what the student consumes |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in results["readers"]:
        lines.append(f"| {row['format']} | {row['workers']} | {row['tokens_per_s']:,.0f} | {row['multiple_of_student']:,.0f}x |")
    lines.append("")
    (out / "train_step.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
