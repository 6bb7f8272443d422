"""Benchmark: an optimiser step of the Hugging Face Trainer path (softcache.hf) vs ``softcache train``'s step.

Same student (benchmarks/configs/student-30m.json), same store and batch, the same optimiser settings (AdamW, lr
1e-4 constant, weight decay 0.1, betas 0.9/0.95, clipping at 1), both unfused, one micro-batch per step, DataLoader
workers 0. The Trainer runs its own loop; a callback times each of its steps (from the end of one step to the end of
the next: reading, forward, loss, backward, clipping, optimiser, its per-step log line) and after every ``--steps`` of
them runs ``--steps`` of ``StudentJob.train_step`` (set up by benchmarks/train_step.py's ``student_job``), so the two
alternate in rounds on the same machine state. One step of each is a warm-up. Medians over rounds of the per-round
mean step time, and the median of the per-round ratios.

    python benchmarks/cache_job.py      # first: writes the store this benchmark reads
    python benchmarks/hf_trainer.py

Writes benchmarks/results/hf_trainer.md (and .json), or into --results.
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
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from softcache.hf import DistillationTrainer, StoreSequences
from softcache.store import open_store
from softcache.student import build_student
from train_step import HERE, job_step, student_job, timed_steps


class Rounds(TrainerCallback):
    """Times the Trainer's steps and, after each ``steps`` of them, ``steps`` of the student job's."""

    def __init__(self, job, steps: int, rounds: int):
        self.job, self.steps, self.rounds = job, steps, rounds
        self.seconds = {"trainer": [], "job": []}
        self.times: list[float] = []
        self.mark = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.mark
        if state.global_step == 1:  # warm-up, of both
            timed_steps(job_step, self.job, None, itertools.repeat(None), 1)
        else:
            self.times.append(elapsed)
        if len(self.times) == self.steps:
            self.seconds["trainer"].append(statistics.mean(self.times))
            self.seconds["job"].append(timed_steps(job_step, self.job, None, itertools.repeat(None), self.steps))
            print(f"round {len(self.seconds['job'])}: trainer {self.seconds['trainer'][-1]:.3f} s/step, "
                  f"job {self.seconds['job'][-1]:.3f} s/step", flush=True)
            self.times = []
            control.should_training_stop = len(self.seconds["job"]) == self.rounds
        self.mark = time.perf_counter()
        return control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(HERE / "out" / "job-zarr"))
    parser.add_argument("--student", default=str(HERE / "configs" / "student-30m.json"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()

    job = student_job(args, HERE / "out" / "hf_trainer_job")  # lr 1e-4, weight decay 0.1, unfused, cpu
    run_dir = HERE / "out" / "hf_trainer_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    rounds = Rounds(job, args.steps, args.rounds)
    training = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
        lr_scheduler_type="constant", weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        max_steps=1 + args.steps * args.rounds, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    student = build_student(args.student, seed=0)
    trainer = DistillationTrainer(student, training, train_dataset=StoreSequences(args.store), fused_linear="off",
                                  callbacks=[rounds])
    trainer.remove_callback(PrinterCallback)
    trainer.train()

    seconds = rounds.seconds
    store = open_store(args.store)
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "student": args.student, "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "vocab": trainer.model.config.vocab_size, "k": store.k, "seq_len": store.layout.seq_len, "store": args.store,
        "batch_size": args.batch_size, "steps_per_round": args.steps, "rounds": len(seconds["job"]),
        "seconds_per_step": seconds, "median_seconds_per_step": {m: statistics.median(s) for m, s in seconds.items()},
        "median_ratio_trainer_to_job": statistics.median(t / j for t, j in zip(seconds["trainer"], seconds["job"])),
    }
    write_report(results, Path(args.results))


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_trainer.json").write_text(json.dumps(results, indent=2) + "\n")
    med = results["median_seconds_per_step"]
    lines = [
        "# Hugging Face Trainer path vs softcache train's step",
        "",
        f"Student {Path(results['student']).name} ({results['parameters'] / 1e6:.1f} M parameters, vocab "
        f"{results['vocab']:,}), batch {results['batch_size']} x {results['seq_len']} tokens, top-{results['k']} "
        f"targets, on CPU ({results['machine']}); {results['rounds']} interleaved rounds of "
        f"{results['steps_per_round']} steps, medians. Produced by `python benchmarks/hf_trainer.py`.",
        "",
        "| step | median s/step | ratio to `softcache train` (median of rounds) |",
        "| --- | ---: | ---: |",
        f"| `StudentJob.train_step` (`softcache train`) | {med['job']:.3f} | 1.000 |",
        f"| `DistillationTrainer` (`softcache.hf`, the Trainer's loop) | {med['trainer']:.3f} | "
        f"{results['median_ratio_trainer_to_job']:.3f} |",
        "",
    ]
    (out / "hf_trainer.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
