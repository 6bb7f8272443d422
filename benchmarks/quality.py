"""Quality benchmark: does distilling from a cached store pay, and how close does it get to online KD?

The real teacher (SmolLM2-135M-Instruct) and the built-in corpus (train topics; every fifth topic
held out). Students of one configuration (the demo's), one initialisation, the same batches and
the same number of steps:
  ce           cross-entropy only
  fkl-bucket   forward KL on cached top-k with the tail bucket, k = 8, 16 and 64
  fkl-renorm   the same, renormalised over the cached ids, k = 8 and 64
  sampled      forward KL against unbiased sampled targets (count / N), N = 16 and 50; at about the
               bytes per token of top-8 and top-16
  online       forward KL against the teacher's full distribution, teacher in memory (the expensive
               reference a user would otherwise run)
KD variants use alpha = 0.5 (half KD, half CE on the true tokens), the online one too. Every
training store is written in one teacher pass (softcache.cache_job.cache_many: the same code as
`softcache cache`, one forward per batch for all of them), with the default encodings. Reported:
held-out CE, the fraction of the CE-to-online gap each variant closes, ECE, KL to the teacher's
top-64 and top-1 agreement on the held-out store, bytes per token, wall time of each student run
and of the teacher job.

    python benchmarks/quality.py                   # about 35 minutes on 2 CPU cores
    python benchmarks/quality.py --steps 100       # quicker, noisier

Writes benchmarks/results/quality.md, quality.json and quality.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache.cache_job import cache_many, run_cache, store_header
from softcache.config import CacheConfig, TrainConfig
from softcache.corpus import iter_documents, pack
from softcache.data import StoreDataset
from softcache.demo import STUDENT
from softcache.evaluate import evaluate
from softcache.optim import adamw, warmup_cosine
from softcache.store import Layout, StoreWriter, open_store
from softcache.student import build_student
from softcache.teacher import identity, load_model, load_tokenizer, output_vocab_size, resolve_source
from softcache.train_job import METRICS, run_train

HERE = Path(__file__).parent


TRAIN_STORES = {  # name: CacheConfig fields of the store's targets
    "top8": {"k": 8}, "top16": {"k": 16}, "top64": {"k": 64},
    "sampled16": {"targets": "sampled", "samples": 16}, "sampled50": {"targets": "sampled", "samples": 50},
}


def teacher_pass(work: Path, seq_len: int, batch_size: int, max_sequences: int | None = None) -> float:
    """Write every training store in one pass of the teacher over the train split; return seconds."""
    configs = {name: CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split="train",
                                 out=str(work / f"{name}-train"), seq_len=seq_len, batch_size=batch_size,
                                 max_sequences=max_sequences, progress=False, **fields)
               for name, fields in TRAIN_STORES.items()}
    if all((Path(c.out) / "manifest.json").exists() and open_store(c.out).complete for c in configs.values()):
        return json.loads((work / "teacher_pass.json").read_text())["seconds"]
    source = resolve_source("builtin:smollm2")
    tokenizer = load_tokenizer(source)
    corpus = pack(iter_documents("builtin:python-docs", split="train"), tokenizer, seq_len, max_sequences,
                  source="builtin:python-docs")
    model = load_model(source, torch.device("cpu"), torch.float32, progress=False)
    vocab = output_vocab_size(model)
    layout = Layout(len(corpus.input_ids), seq_len, 256)
    jobs = []
    for config in configs.values():
        header = store_header(config, layout, config.encoding(vocab), identity(source, model, torch.float32),
                              tokenizer, vocab, corpus.describe())
        writer = StoreWriter.open(config.out, header)
        writer.save_tokenizer(tokenizer.save_pretrained)
        jobs.append((writer, config))
    started = time.perf_counter()
    cache_many(model, corpus.input_ids, jobs, batch_size, torch.device("cpu"))
    seconds = time.perf_counter() - started
    for writer, _ in jobs:
        writer.finish()
    (work / "teacher_pass.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def online_kd(teacher, store: str, heldout: str, student_config: Path, steps: int, batch_size: int, lr: float,
              seed: int, alpha: float, out: Path) -> dict:
    """The reference: the same student loop, targets from the teacher's full distribution per batch."""
    if (out / "eval.json").exists():  # done before: delete the directory to measure again
        return json.loads((out / "eval.json").read_text())
    torch.manual_seed(seed)
    model = build_student(str(student_config), seed)
    optimizer = adamw(model, lr, 0.1)
    scheduler = warmup_cosine(optimizer, round(0.05 * steps), steps, 0.1)
    loader = iter(DataLoader(StoreDataset(store, batch_size, seed=seed), batch_size=None,
                             generator=torch.Generator().manual_seed(seed)))
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(loader)
        with torch.no_grad():
            teacher_logprobs = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.float(), -1)
        logits = model(input_ids=batch["input_ids"]).logits
        student_logprobs = torch.log_softmax(logits.float(), -1)
        kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                               ignore_index=-100, reduction="sum")
        loss = (alpha * (kl * batch["mask"]).sum() / batch["mask"].sum().clamp_min(1)
                + (1 - alpha) * ce / (batch["labels"] >= 0).sum().clamp_min(1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    result = evaluate(model, heldout, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**result, "seconds": seconds}))
    return {**result, "seconds": seconds}


def cached_run(store: Path, heldout: Path, student_config: Path, out: Path, steps: int, batch_size: int, lr: float,
               seed: int, alpha: float, tail: str) -> dict:
    if not (out / "final").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        run_train(TrainConfig(store=str(store), student=str(student_config), out=str(out), steps=steps,
                              batch_size=batch_size, lr=lr, alpha=alpha, tail=tail, seed=seed,
                              eval_store=str(heldout), checkpoint_every=steps, num_workers=0, progress=False))
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    seconds = sum(line["tokens"] / line["tokens_per_s"] for line in lines)
    return {**lines[-1]["eval"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-sequences", type=int, default=None, help="cut the corpus (quick checks only)")
    parser.add_argument("--work", default=str(HERE / "out" / "quality"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student_config = work / "student.json"
    student_config.write_text(json.dumps(STUDENT))

    teacher_seconds = {"train (all stores, one pass)": teacher_pass(work, args.seq_len, 8, args.max_sequences)}
    started = time.perf_counter()
    run_cache(CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split="heldout",
                          out=str(work / "top64-heldout"), seq_len=args.seq_len, k=64, batch_size=8,
                          max_sequences=args.max_sequences, progress=False))
    teacher_seconds["held-out"] = time.perf_counter() - started
    heldout = work / "top64-heldout"

    rows = {}
    a = args.alpha
    plan = [("ce", "top64", 0.0, None), ("fkl-bucket k=8", "top8", a, "bucket"),
            ("fkl-bucket k=16", "top16", a, "bucket"), ("fkl-bucket k=64", "top64", a, "bucket"),
            ("fkl-renorm k=8", "top8", a, "renorm"), ("fkl-renorm k=64", "top64", a, "renorm"),
            ("sampled N=16", "sampled16", a, None), ("sampled N=50", "sampled50", a, None)]
    for name, store, alpha, tail in plan:
        out = work / name.replace(" ", "-").replace("=", "")
        rows[name] = cached_run(work / f"{store}-train", heldout, student_config, out, args.steps, args.batch_size,
                                args.lr, args.seed, alpha, tail)
        rows[name]["bytes_per_token"] = None if alpha == 0 else \
            open_store(work / f"{store}-train").manifest["totals"]["bytes_per_token"]
        print(name, rows[name], flush=True)
    source = resolve_source("builtin:smollm2")
    teacher = load_model(source, torch.device("cpu"), torch.float32, progress=False)
    rows["online full-vocab KD"] = online_kd(teacher, str(work / "top64-train"), str(heldout), student_config,
                                             args.steps, args.batch_size, args.lr, args.seed, args.alpha,
                                             work / "online")
    rows["online full-vocab KD"]["bytes_per_token"] = None
    print("online", rows["online full-vocab KD"], flush=True)

    gap = rows["ce"]["ce"] - rows["online full-vocab KD"]["ce"]
    for row in rows.values():
        row["gap_closed"] = (rows["ce"]["ce"] - row["ce"]) / gap if gap > 0 else float("nan")
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "steps": args.steps, "alpha": args.alpha, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
        "seed": args.seed, "student": STUDENT, "teacher_job_seconds": teacher_seconds,
        "teacher_heldout_ce": open_store(heldout).manifest["totals"]["teacher_ce"],
        "train_tokens": open_store(work / "top64-train").layout.num_tokens, "rows": rows,
    }
    write_report(results)


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["rows"]
    online = rows["online full-vocab KD"]["seconds"]
    lines = [
        "# Distillation quality: cached targets vs cross-entropy vs online KD",
        "",
        f"Teacher SmolLM2-135M-Instruct (held-out CE {results['teacher_heldout_ce']:.3f}); corpus builtin:python-docs, "
        f"{results['train_tokens']:,} training tokens (train topics), every fifth topic held out; a "
        f"16 M-parameter Llama student (`softcache.demo.STUDENT`), seed {results['seed']}, "
        f"{results['steps']} steps of {results['batch_size']} x {results['seq_len']} tokens, lr {results['lr']}, "
        f"alpha {results['alpha']} for every KD row, "
        f"the same batches for every row. CPU: {results['machine']}. Teacher job: "
        + " + ".join(f"{seconds:.0f} s ({name})" for name, seconds in results["teacher_job_seconds"].items())
        + ", paid once for every cached row. Produced by `python benchmarks/quality.py`.",
        "",
        "| student | held-out CE | gap to online KD closed | ECE | KL to teacher | top-1 agreement | bytes/token "
        "| student run | online run / this run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        size = "" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.1f}"
        lines.append(f"| {name} | {row['ce']:.3f} | {100 * row['gap_closed']:.0f}% | {row['ece']:.3f} | "
                     f"{row['kl']:.3f} | {row['top1_agreement']:.3f} | {size} | {row['seconds']:.0f} s | "
                     f"{online / row['seconds']:.1f}x |")
    lines += ["", "![held-out CE by student](quality.png)", ""]
    (out / "quality.md").write_text("\n".join(lines))
    plot(results, out / "quality.png")
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(rows)
    values = [rows[n]["ce"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(names, values, color=["#999999"] + ["#4477aa"] * (len(names) - 2) + ["#cc6677"])
    for y, value in enumerate(values):
        ax.text(value + 0.005, y, f"{value:.3f}", va="center", fontsize=9)
    ax.set_xlim(min(values) - 0.15, max(values) + 0.08)
    ax.invert_yaxis()
    ax.set_xlabel("held-out cross-entropy (nats/token), lower is better")
    ax.set_title(f"Students after {results['steps']} steps (teacher: {results['teacher_heldout_ce']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--report-only":  # redraw from results/quality.json
        write_report(json.loads((HERE / "results" / "quality.json").read_text()))
    else:
        main()
