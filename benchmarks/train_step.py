"""Benchmark: a KD-from-store training step vs a plain cross-entropy step, and the reader's throughput.

Same student (benchmarks/configs/student-30m.json, vocab 49,152), same batches from the same store
(top-64 targets of SmolLM2-135M-Instruct), same optimiser. Each round runs ``--steps`` steps of each
mode back to back:
  ce -- input_ids from the store, ``model(input_ids, labels=labels).loss`` (what a user runs without
        softcache), backward, AdamW step;
  kd -- the full batch from the store, the student job's loss (``DistillationLoss``: forward KL, tail
        bucket) with alpha 0.5, backward, AdamW step;
  job -- ``StudentJob.train_step``, the optimiser step ``softcache train`` runs (the same loss, plus the
        step's valid-position counts, gradient clipping and the learning-rate schedule).
Medians over rounds of the per-round mean step time. Then the reader alone: StoreDataset batches
per second for each format and DataLoader worker count, in tokens/s, against what the KD step consumes.

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
from softcache.losses import DistillationLoss
from softcache.optim import adamw
from softcache.store import open_store
from softcache.student import build_student
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


def student_job(args, run_dir: Path) -> StudentJob:
    """The student job set up to its first step (same store, student, seed, batch and optimiser as above)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(store=args.store, student=args.student, out=str(run_dir), steps=10**6, batch_size=args.batch_size,
                         lr=1e-4, weight_decay=0.1, checkpoint_every=10**6, num_workers=0, fused_linear="off",
                         device="cpu", progress=False)
    job = StudentJob(config)
    for step in (job.setup_store, job.setup_model, job.setup_forward, job.setup_optimizer, job.restore, job.setup_data):
        step()
    return job


def job_step(job: StudentJob, optimizer, batch) -> None:
    job.train_step()  # reads its own batch from the job's loader


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
    parser.add_argument("--arrow-store", default=str(HERE / "out" / "codec-arrow-none"))
    parser.add_argument("--student", default=str(HERE / "configs" / "student-30m.json"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    store = open_store(args.store)
    seq_len, k = store.layout.seq_len, store.k
    models = {mode: build_student(args.student, seed=0) for mode in ("ce", "kd")}
    optimizers = {mode: adamw(model, 1e-4, 0.1) for mode, model in models.items()}
    streams = {mode: batches(args.store, args.batch_size) for mode in models}  # same seed: same batches
    job = student_job(args, HERE / "out" / "train_step_job")
    models["job"], optimizers["job"], streams["job"] = job, job.optimizer, itertools.repeat(None)
    steps = {"ce": ce_step, "kd": kd_step, "job": job_step}
    for mode in models:  # warm-up
        timed_steps(steps[mode], models[mode], optimizers[mode], streams[mode], 1)
    seconds = {"ce": [], "kd": [], "job": []}
    for round_ in range(args.rounds):
        for mode in seconds:
            seconds[mode].append(timed_steps(steps[mode], models[mode], optimizers[mode], streams[mode], args.steps))
        print(f"round {round_ + 1}: " + ", ".join(f"{m} {s[-1]:.3f} s/step" for m, s in seconds.items()), flush=True)
    ratio = statistics.median(kd / ce for kd, ce in zip(seconds["kd"], seconds["ce"]))
    job_ratio = statistics.median(j / ce for j, ce in zip(seconds["job"], seconds["ce"]))
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
        "median_ratio_kd_to_ce": ratio, "median_ratio_job_to_ce": job_ratio, "student_tokens_per_s": consumed,
        "readers": readers,
        "encoding": {"ids": store.encoding.ids, "values": store.encoding.values},
    }
    write_report(results)


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
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
        "| step | median s/step | ratio to CE (median of rounds) |",
        "| --- | ---: | ---: |",
        f"| plain CE (`model(..., labels=...).loss`) | {med['ce']:.3f} | 1.000 |",
        f"| KD from store (fkl, tail bucket, alpha 0.5) | {med['kd']:.3f} | {results['median_ratio_kd_to_ce']:.3f} |",
        *([f"| `StudentJob.train_step` (the same loss, counts, clipping, schedule) | {med['job']:.3f} | "
           f"{results['median_ratio_job_to_ce']:.3f} |"] if "job" in med else []),
        "",
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
