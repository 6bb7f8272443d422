"""Quality benchmark: does distilling from a cached store pay, and how close does it get to online KD?

The real teacher (SmolLM2-135M-Instruct) and the built-in corpus (train topics; every fifth topic
held out). Students of one configuration (the demo's), one initialisation, the same batches and
the same number of steps:
  ce           cross-entropy only
  fkl-bucket   forward KL on cached top-k with the tail bucket, k = 8 and 64
  fkl-renorm   the same, renormalised over the cached ids, k = 8 and 64
  online       forward KL against the teacher's full distribution, teacher in memory (the expensive
               reference a user would otherwise run)
KD variants use alpha = 0.5 (half KD, half CE on the true tokens), the online one too. The top-8 store is the top-64 store's first 8 entries per
position, which is exactly what a k = 8 teacher job writes (entries are sorted and normalised over
the full vocabulary). Reported: held-out CE, the fraction of the CE-to-online gap each variant
closes, ECE, KL to the teacher and top-1 agreement, bytes per token, wall time of each student run
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

from softcache.cache_job import run_cache
from softcache.config import CacheConfig, TrainConfig
from softcache.data import StoreDataset
from softcache.demo import STUDENT
from softcache.evaluate import evaluate
from softcache.optim import adamw, warmup_cosine
from softcache.store import Layout, StoreWriter, open_store
from softcache.store.registry import storage_section
from softcache.store.writer import derived_header
from softcache.student import build_student
from softcache.teacher import load_model, resolve_source
from softcache.train_job import METRICS, run_train

HERE = Path(__file__).parent


def truncate_store(source: Path, dest: Path, k: int) -> None:
    """Write the first k entries per position of ``source`` as a new store (same everything else)."""
    if (dest / "manifest.json").exists():
        return
    store = open_store(source)
    layout = Layout.from_dict({**store.manifest["layout"], "k": k})
    header = derived_header(store.manifest, layout=layout.to_dict(),
                            storage=storage_section(store.manifest["storage"]["format"], layout),
                            targets={**store.manifest["targets"], "k": k,
                                     "derived_from": f"the first {k} entries of a top-{store.layout.k} store"})
    writer = StoreWriter.open(dest, header)
    writer.save_tokenizer(lambda directory: shutil.copytree(store.tokenizer_path, directory))
    for index in writer.pending:
        first, count = writer.layout.shard_bounds(index)
        raw = store.read_raw(first, first + count)
        arrays = {"input_ids": np.ascontiguousarray(raw["input_ids"]),
                  "target_ids": np.ascontiguousarray(raw["target_ids"][:, :, :k]),
                  "target_logprobs": np.ascontiguousarray(raw["target_logprobs"][:, :, :k])}
        writer.write_shard(index, arrays, teacher_nll=store.shards[index].get("teacher_nll"))
    writer.finish()


def online_kd(teacher, store: str, heldout: str, student_config: Path, steps: int, batch_size: int, lr: float,
              seed: int, alpha: float, out: Path) -> dict:
    """The reference: the same student loop, targets from the teacher's full distribution per batch."""
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
    parser.add_argument("--work", default=str(HERE / "out" / "quality"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student_config = work / "student.json"
    student_config.write_text(json.dumps(STUDENT))

    teacher_seconds = {}
    for split in ("train", "heldout"):
        started = time.perf_counter()
        run_cache(CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split=split,
                              out=str(work / f"top64-{split}"), seq_len=args.seq_len, k=64, batch_size=8,
                              progress=False))
        teacher_seconds[split] = time.perf_counter() - started
    truncate_store(work / "top64-train", work / "top8-train", 8)
    heldout = work / "top64-heldout"

    rows = {}
    a = args.alpha
    plan = [("ce", "top64", 0.0, "bucket"), ("fkl-bucket k=8", "top8", a, "bucket"),
            ("fkl-bucket k=64", "top64", a, "bucket"), ("fkl-renorm k=8", "top8", a, "renorm"),
            ("fkl-renorm k=64", "top64", a, "renorm")]
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
        f"{results['teacher_job_seconds']['train']:.0f} s (train) + {results['teacher_job_seconds']['heldout']:.0f} s "
        "(held-out), paid once for every cached row. Produced by `python benchmarks/quality.py`.",
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
