"""Cross-tokenizer benchmark: a student with another tokenizer, taught from the teacher's store.

The real teacher (SmolLM2-135M-Instruct, vocabulary 49,152) caches sampled targets (N = 50, the
kind that matched online KD in benchmarks/quality.py) over the built-in corpus's train topics,
once. A byte-level BPE tokenizer of --student-vocab tokens is trained here on the same train text;
the store's view in that tokenizer is built (softcache view) for the train store and for a held-out
top-64 store (every fifth topic). Students of the demo's shape with that vocabulary then train
through the view, the same batches per seed:

  ce            cross-entropy only (alpha 0): the baseline
  projection    + forward KL to the teacher ids that have a student token of the same bytes, tail bucket
  uld           + the sorted-probability distance (universal logit distillation)
  hybrid        + both (projection for what maps, uld for how the rest is spread)

Compared on held-out text in bits per byte (the unit that does not depend on the tokenizer),
several seeds, differences paired by seed (mean and standard error). Also measured, side by side in
one process: the reader's batches per second through the view (alignment gathered, targets
projected) against the plain store reader, and the student's own training steps per second.

    python benchmarks/cross_tokenizer.py                    # about 35 minutes on 2 CPU cores
    python benchmarks/cross_tokenizer.py --seeds 0 1        # fewer seeds
    python benchmarks/cross_tokenizer.py --report-only      # rewrite the report from the JSON

Stores, views and finished runs under benchmarks/out/cross_tokenizer are reused.
Writes benchmarks/results/cross_tokenizer.md and cross_tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from softcache.cache_job import run_cache
from softcache.config import CacheConfig, TrainConfig
from softcache.corpus import python_docs
from softcache.cross_data import ViewDataset
from softcache.data import StoreDataset
from softcache.demo import STUDENT
from softcache.store import open_store
from softcache.train_job import METRICS, run_train
from softcache.view import View, build_view
from student_runs import add_student_arguments

HERE = Path(__file__).parent
VARIANTS = {"ce": ("hybrid", 0.0), "projection": ("projection", None), "uld": ("uld", None), "hybrid": ("hybrid", None)}
"""name: (--cross-loss, alpha; None: --alpha)."""


def student_tokenizer(directory: Path, vocab: int):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on the train topics, saved in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (directory / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(directory)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(python_docs("train"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def stores(work: Path, seq_len: int, samples: int, max_sequences: int | None) -> dict:
    out = {}
    # Independent draws: results/cross_tokenizer.md's training store was written before systematic draws.
    train = {"targets": "sampled", "samples": samples, "draws": "independent"}
    for name, split, fields in (("train", "train", train), ("heldout", "heldout", {"targets": "topk", "k": 64})):
        result = run_cache(CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split=split,
                                       out=str(work / f"{name}-store"), seq_len=seq_len, batch_size=8,
                                       max_sequences=max_sequences, progress=False, **fields))
        record = work / f"{name}-store.seconds.json"
        if not result.already_complete:
            record.write_text(json.dumps({"seconds": result.seconds}))
        out[name] = json.loads(record.read_text())["seconds"] if record.exists() else None
    return out


def views(work: Path, tokenizer) -> dict:
    seconds = {}
    for name in ("train", "heldout"):
        path = work / f"{name}-view"
        record = work / f"{name}-view.seconds.json"
        if not path.exists():
            started = time.perf_counter()
            build_view(open_store(work / f"{name}-store"), tokenizer, path, progress=False)
            record.write_text(json.dumps({"seconds": time.perf_counter() - started}))
        seconds[name] = json.loads(record.read_text())["seconds"]
    return seconds


def student(work: Path, tokenizer) -> Path:
    directory = work / "student"
    tokenizer.save_pretrained(directory)
    config = {**STUDENT, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def train(work: Path, student_dir: Path, name: str, seed: int, args) -> dict:
    cross_loss, alpha = VARIANTS[name]
    out = work / f"{name}-seed{seed}"
    if not (out / "final").is_dir():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        run_train(TrainConfig(store=str(work / "train-store"), student=str(student_dir), out=str(out),
                              steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              alpha=args.alpha if alpha is None else alpha, seed=seed, tokenizers="cross",
                              view=str(work / "train-view"), cross_loss=cross_loss, checkpoint_every=args.steps,
                              num_workers=0, progress=False))
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    seconds = sum(line["tokens"] / line["tokens_per_s"] for line in lines)
    evaluation = out / "heldout.json"
    if not evaluation.exists():
        from transformers import AutoModelForCausalLM

        from softcache.evaluate import evaluate

        model = AutoModelForCausalLM.from_pretrained(out / "final")
        result = evaluate(model, str(work / "heldout-store"), batch_size=args.batch_size,
                          view=str(work / "heldout-view"))
        evaluation.write_text(json.dumps(result))
    return {**json.loads(evaluation.read_text()), "seconds": seconds, "steps_per_s": len(lines) / seconds}


def reader_rates(work: Path, batch_size: int, batches: int, rounds: int) -> dict:
    """Batches per second of the plain store reader and of the view reader (each cross loss's), medians
    of ``rounds`` alternating rounds in this process."""
    store = str(work / "train-store")

    def rate(make) -> float:
        dataset = make()
        iterator = iter(dataset)
        next(iterator)  # opens the store (and the view) in this "worker"
        started = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches / (time.perf_counter() - started)

    makers = {"store": lambda: StoreDataset(store, batch_size, seed=0, world_size=1, rank=0)}
    for cross_loss in ("projection", "hybrid"):
        makers[f"view, {cross_loss}"] = (lambda c: lambda: ViewDataset(
            store, str(work / "train-view"), batch_size, c, seed=0, world_size=1, rank=0))(cross_loss)
    samples = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            samples[name].append(rate(make))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_student_arguments(parser, "every variant is trained with each")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--max-sequences", type=int, default=None, help="cut the corpus (quick checks only)")
    parser.add_argument("--student-vocab", type=int, default=8192)
    parser.add_argument("--reader-batches", type=int, default=40)
    parser.add_argument("--reader-rounds", type=int, default=5)
    parser.add_argument("--work", default=str(HERE / "out" / "cross_tokenizer"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    results_path = HERE / "results" / "cross_tokenizer.json"
    if args.report_only:
        write_report(json.loads(results_path.read_text()))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher_seconds = stores(work, args.seq_len, args.samples, args.max_sequences)
    tokenizer = student_tokenizer(work / "tokenizer", args.student_vocab)
    view_seconds = views(work, tokenizer)
    student_dir = student(work, tokenizer)
    runs = {}
    for seed in args.seeds:
        for name in VARIANTS:
            runs.setdefault(name, {})[seed] = train(work, student_dir, name, seed, args)
            print(seed, name, {k: runs[name][seed][k] for k in ("bits_per_byte", "ce", "kl", "seconds")}, flush=True)
    rates = reader_rates(work, args.batch_size, args.reader_batches, args.reader_rounds)
    train_store, train_view = open_store(work / "train-store"), View(work / "train-view", verify=False)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "report_only")},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "teacher": {"vocab": open_store(work / "train-store").tokenizer.vocab_size, "seconds": teacher_seconds,
                    "train_tokens": train_store.layout.num_tokens,
                    "bytes_per_token": train_store.manifest["totals"]["bytes_per_token"]},
        "student_vocab": len(tokenizer),
        "view": {"seconds": view_seconds, "counts": train_view.manifest["counts"],
                 "aligned_share": train_view.counts.aligned_share, "mapped_share": train_view.counts.mapped_share,
                 "max_length": train_view.max_length,
                 "bytes": sum(p.stat().st_size for p in (work / "train-view").rglob("*") if p.is_file() and
                              "tokenizer" not in p.parts)},
        "reader_batches_per_s": rates,
        "runs": {name: {str(seed): result for seed, result in by_seed.items()} for name, by_seed in runs.items()},
        "command": " ".join(["python", "benchmarks/cross_tokenizer.py", *sys.argv[1:]]),
    }
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    write_report(results)


def write_report(results: dict) -> None:
    runs, settings, view = results["runs"], results["settings"], results["view"]
    seeds = list(runs["ce"])
    lines = [
        "# Cross-tokenizer distillation: a student with its own tokenizer, taught from the teacher's store",
        "",
        f"Teacher SmolLM2-135M-Instruct (vocabulary {results['teacher']['vocab']:,}), sampled targets N = "
        f"{settings['samples']} ({results['teacher']['bytes_per_token']:.1f} bytes/token) over the built-in corpus's "
        f"train topics ({results['teacher']['train_tokens']:,} teacher tokens); a byte-level BPE tokenizer of "
        f"{results['student_vocab']:,} tokens trained here on the same text; students of the demo's shape with "
        f"that vocabulary, {settings['steps']} steps of {settings['batch_size']} sequences, lr {settings['lr']}, "
        f"alpha {settings['alpha']} for every KD row, the same batches per seed. Held out: every fifth topic, "
        f"through its own view. CPU: {results['machine']}. Produced by `{results['command']}`.",
        "",
        f"The train view: {view['aligned_share']:.1%} of the student's positions meet a teacher position; "
        f"{view['mapped_share']:.1%} of the teacher's cached mass there is on tokens the student has; the longest "
        f"student sequence is {view['max_length']} tokens (the teacher's are {settings['seq_len']}). Built in "
        f"{view['seconds']['train']:.1f} s ({view['counts']['sequences']:,} sequences), "
        f"{view['bytes'] / max(view['counts']['positions'], 1):.1f} bytes per student position on disk.",
        "",
        f"Held-out bits per byte (lower is better), seeds {' / '.join(seeds)}. Differences are paired by seed "
        "(same initialisation and batches); s.e. is the standard error of their mean.",
        "",
        f"| student | bits per byte, seeds {' / '.join(seeds)} | mean | minus ce's, mean ± s.e. | held-out CE "
        "(nats/student token) | KL to teacher (projected) | median run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, by_seed in runs.items():
        bpb = [by_seed[s]["bits_per_byte"] for s in seeds]
        diff = "" if name == "ce" else paired(runs, name, "ce", seeds)
        lines.append(f"| {name} | {' / '.join(f'{b:.4f}' for b in bpb)} | {statistics.mean(bpb):.4f} | {diff} | "
                     f"{statistics.mean(by_seed[s]['ce'] for s in seeds):.3f} | "
                     f"{statistics.mean(by_seed[s]['kl'] for s in seeds):.3f} | "
                     f"{statistics.median(by_seed[s]['seconds'] for s in seeds):.0f} s |")
    lines += ["", f"hybrid minus projection, paired by seed: {paired(runs, 'hybrid', 'projection', seeds)} bits per "
              "byte. The ce row trains with alpha 0 through the same loss as hybrid (its KD term computed and "
              "weighted 0), so its run time is hybrid's; projection's runs are the cheapest: no sorted distance."]
    rates = results["reader_batches_per_s"]
    steps = statistics.median(r["steps_per_s"] for by_seed in runs.values() for r in by_seed.values())
    lines += [
        "",
        f"Reader throughput, batches of {settings['batch_size']} sequences per second (one worker, medians of "
        f"{settings['reader_rounds']} alternating rounds of {settings['reader_batches']} batches in one process), "
        "against the student's own optimiser steps per second:",
        "",
        "| reader | batches/s | vs the plain store reader | vs the student's steps/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:.1f} | {rate / rates['store']:.2f}x | {rate / steps:.0f}x |")
    lines.append("")
    (HERE / "results" / "cross_tokenizer.md").write_text("\n".join(lines))
    print("\n".join(lines))


def paired(runs: dict, name: str, reference: str, seeds: list) -> str:
    """Mean ± standard error over seeds of (``name``'s bits per byte - ``reference``'s)."""
    d = [runs[name][s]["bits_per_byte"] - runs[reference][s]["bits_per_byte"] for s in seeds]
    error = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{statistics.mean(d):+.4f} ± {error:.4f}"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
