"""Quality benchmark: does distilling from a cached store pay, and how close does it get to online KD?

The real teacher (SmolLM2-135M-Instruct) and the built-in corpus (train topics; every fifth topic
held out). Students of one configuration (the demo's), one initialisation per seed, the same
batches and the same number of steps:
  ce           cross-entropy only
  fkl-bucket   forward KL on cached top-k with the tail bucket, k = 8, 16, 64 and 1024
  fkl-renorm   the same, renormalised over the cached ids, k = 8 and 64
  sampled      forward KL against unbiased sampled targets (count / N), N = 16, 50, 100 and 200
  online       forward KL against the teacher's full distribution, teacher in memory (the expensive
               reference a user would otherwise run)
KD variants use alpha = 0.5 (half KD, half CE on the true tokens), the online one too. Every row
is trained with the first seed; the rows in SEEDED again with each further seed (another
initialisation and batch order), and each seed's gap is measured against its own ce and online
runs. The training stores are written by one teacher pass (softcache.cache_job.TeacherJob: the
same code as `softcache cache`, one forward per batch for all of them) with the default encodings;
stores already there are reused, and every pass is reported. Reported: held-out CE, the fraction
of the CE-to-online gap each variant closes, ECE, KL to the teacher's top-64 and top-1 agreement
on the held-out store, bytes per token, wall time of each student run and of the teacher job.

    python benchmarks/quality.py                   # about 2.5 hours on 2 CPU cores (5 seeds)
    python benchmarks/quality.py --seeds 0         # one seed: about 45 minutes
    python benchmarks/quality.py --report-only     # redraw from results/quality.json

Run directories are reused: delete benchmarks/out/quality/<row> to train a row again.
Writes benchmarks/results/quality.md, quality.json and quality.png.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from softcache.cache_job import TeacherJob, run_cache
from softcache.config import CacheConfig, TrainConfig
from softcache.data import StoreDataset
from softcache.demo import STUDENT
from softcache.evaluate import evaluate
from softcache.optim import adamw, warmup_cosine
from softcache.store import open_store
from softcache.student import build_student
from softcache.teacher import load_model, resolve_source
from softcache.train_job import METRICS, run_train
from student_runs import pyplot, run_or_report, store_complete, student_benchmark_setup

HERE = Path(__file__).parent


TRAIN_STORES = {  # name: CacheConfig fields of the store's targets
    "top8": {"targets": "topk", "k": 8}, "top16": {"targets": "topk", "k": 16}, "top64": {"targets": "topk", "k": 64},
    "top1024": {"targets": "topk", "k": 1024},
    # Independent draws: the stores of results/quality.md's sampled rows were written before systematic draws.
    **{f"sampled{n}": {"targets": "sampled", "samples": n, "draws": "independent"} for n in (16, 50, 100, 200)},
}
# Rows trained again with --seeds beyond the first (other initialisation and batch order): the
# references and the best cached variants, to show how much of a difference is noise.
ONLINE = "online full-vocab KD"
SEEDED = ("ce", "fkl-bucket k=64", "fkl-bucket k=1024", "sampled N=50", "sampled N=100", ONLINE)


def teacher_pass(work: Path, seq_len: int, batch_size: int, max_sequences: int | None = None) -> list[dict]:
    """Write the training stores that are not there yet in one pass of the teacher over the train
    split. Returns every pass so far: [{"stores": [...], "seconds": ...}] (teacher_pass.json)."""
    record = work / "teacher_pass.json"
    passes = json.loads(record.read_text()) if record.exists() else []
    configs = {name: CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split="train",
                                 out=str(work / f"{name}-train"), seq_len=seq_len, batch_size=batch_size,
                                 max_sequences=max_sequences, progress=False, **fields)
               for name, fields in TRAIN_STORES.items()}
    missing = {name: config for name, config in configs.items() if not store_complete(config.out)}
    if not missing:
        return passes
    job = TeacherJob(list(missing.values()))  # what `softcache cache` runs, for several stores at once
    job.run()
    seconds = job.seconds  # the teacher pass and the writes, not loading
    passes.append({"stores": list(missing), "seconds": seconds})
    record.write_text(json.dumps(passes))
    return passes


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


def run_dir(work: Path, name: str, seed: int, first_seed: int) -> Path:
    base = work / name.replace(" ", "-").replace("=", "")
    return base if seed == first_seed else base.with_name(f"{base.name}-seed{seed}")


def main() -> None:
    args, work, student_config = student_benchmark_setup(__doc__, "every row is trained with the first; the rows in SEEDED with each of the others", HERE / "out" / "quality")

    passes = teacher_pass(work, args.seq_len, 8, args.max_sequences)
    heldout = work / "top64-heldout"
    heldout_seconds = work / "heldout_pass.json"
    result = run_cache(CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split="heldout",
                                   out=str(heldout), seq_len=args.seq_len, targets="topk", k=64, batch_size=8,
                                   max_sequences=args.max_sequences, progress=False))
    if not result.already_complete:  # a reused store keeps the time of the pass that wrote it
        heldout_seconds.write_text(json.dumps({"seconds": result.seconds}))

    a = args.alpha
    plan = [("ce", "top64", 0.0, None), ("fkl-bucket k=8", "top8", a, "bucket"),
            ("fkl-bucket k=16", "top16", a, "bucket"), ("fkl-bucket k=64", "top64", a, "bucket"),
            ("fkl-bucket k=1024", "top1024", a, "bucket"),
            ("fkl-renorm k=8", "top8", a, "renorm"), ("fkl-renorm k=64", "top64", a, "renorm"),
            ("sampled N=16", "sampled16", a, None), ("sampled N=50", "sampled50", a, None),
            ("sampled N=100", "sampled100", a, None), ("sampled N=200", "sampled200", a, None)]
    teacher = None
    runs = {}  # seed -> name -> result
    for seed in args.seeds:
        rows = runs.setdefault(seed, {})
        for name, store, alpha, tail in plan:
            if seed != args.seeds[0] and name not in SEEDED:
                continue
            rows[name] = cached_run(work / f"{store}-train", heldout, student_config,
                                    run_dir(work, name, seed, args.seeds[0]), args.steps, args.batch_size, args.lr,
                                    seed, alpha, tail)
            rows[name]["bytes_per_token"] = None if alpha == 0 else \
                open_store(work / f"{store}-train").manifest["totals"]["bytes_per_token"]
            print(seed, name, rows[name], flush=True)
        if teacher is None:
            teacher = load_model(resolve_source("builtin:smollm2"), torch.device("cpu"), torch.float32,
                                 progress=False)
        rows[ONLINE] = online_kd(teacher, str(work / "top64-train"), str(heldout), student_config,
                                      args.steps, args.batch_size, args.lr, seed, args.alpha,
                                      run_dir(work, "online", seed, args.seeds[0]))
        rows[ONLINE]["bytes_per_token"] = None
        print(seed, "online", rows[ONLINE], flush=True)

    teacher_seconds = {f"train stores {', '.join(p['stores'])}": p["seconds"] for p in passes}
    if heldout_seconds.exists():
        teacher_seconds["held-out"] = json.loads(heldout_seconds.read_text())["seconds"]
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "steps": args.steps, "alpha": args.alpha, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
        "seed": args.seeds[0], "seeds": args.seeds, "student": STUDENT, "teacher_job_seconds": teacher_seconds,
        "teacher_heldout_ce": open_store(heldout).manifest["totals"]["teacher_ce"],
        "train_tokens": open_store(work / "top64-train").layout.num_tokens,
        "seeded": {str(seed): rows for seed, rows in runs.items()},  # seed -> row name -> result
    }
    write_report(results)


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    seeded = results["seeded"]
    rows = seeded[str(results["seed"])]
    online = rows[ONLINE]["seconds"]
    seeds = results["seeds"]
    lines = [
        "# Distillation quality: cached targets vs cross-entropy vs online KD",
        "",
        f"Teacher SmolLM2-135M-Instruct (held-out CE {results['teacher_heldout_ce']:.3f}); corpus builtin:python-docs, "
        f"{results['train_tokens']:,} training tokens (train topics), every fifth topic held out; a "
        f"16 M-parameter Llama student (`softcache.demo.STUDENT`), "
        f"{results['steps']} steps of {results['batch_size']} x {results['seq_len']} tokens, lr {results['lr']}, "
        f"alpha {results['alpha']} for every KD row, the same batches for every row of a seed. "
        f"CPU: {results['machine']}. Teacher job (paid once for every cached row): "
        + " + ".join(f"{seconds:.0f} s ({name})" for name, seconds in results["teacher_job_seconds"].items())
        + ". Produced by `python benchmarks/quality.py`.",
        "",
        f"Seed {seeds[0]}, every row:",
        "",
        "| student | held-out CE | gap to online KD closed | ECE | KL to teacher | top-1 agreement | bytes/token "
        "| student run | online run / this run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        size = "" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.1f}"
        gap = percent(gap_closed(rows, name))
        lines.append(f"| {name} | {row['ce']:.3f} | {gap} | {row['ece']:.3f} | "
                     f"{row['kl']:.3f} | {row['top1_agreement']:.3f} | {size} | {row['seconds']:.0f} s | "
                     f"{online / row['seconds']:.1f}x |")
    if len(seeded) > 1:
        names = [name for name in rows if all(name in by_name for by_name in seeded.values())]
        header = " / ".join(str(seed) for seed in seeded)
        mean_ce = {name: {"ce": statistics.mean(by_name[name]["ce"] for by_name in seeded.values())} for name in names}
        online_median = statistics.median(by_name[ONLINE]["seconds"] for by_name in seeded.values())
        lines += ["", f"Seeds {header} (another initialisation and batch order per seed). Differences are paired "
                      "by seed (same initialisation and batches), in nats, negative is better; s.e. is the "
                      "standard error of their mean. A seed's gap is measured against its own CE and online runs "
                      "(n/a where online KD did not beat CE); the last gap column uses the mean CEs. Run times "
                      "are medians over the seeds.",
                  "", f"| student | held-out CE, seeds {header} | mean CE | minus CE's, mean ± s.e. "
                      f"| minus online KD's, mean ± s.e. | gap closed, seeds {header} | gap closed, mean CEs "
                      "| median run | online / this |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in names:
            per_seed = [by_name[name] for by_name in seeded.values()]
            ces = " / ".join(f"{row['ce']:.3f}" for row in per_seed)
            gaps = " / ".join(percent(gap_closed(by_name, name)) for by_name in seeded.values())
            run = statistics.median(row["seconds"] for row in per_seed)
            lines.append(f"| {name} | {ces} | {mean_ce[name]['ce']:.3f} | {paired(seeded, name, 'ce')} | "
                         f"{paired(seeded, name, ONLINE)} | {gaps} | {percent(gap_closed(mean_ce, name))} | "
                         f"{run:.0f} s | {online_median / run:.1f}x |")
    lines += ["", "![held-out CE by student](quality.png)", ""]
    (out / "quality.md").write_text("\n".join(lines))
    plot(results, out / "quality.png")
    print("\n".join(lines))


def gap_closed(by_name: dict, name: str) -> float:
    """The fraction of the CE-only row's distance to online KD that row ``name`` closes (NaN where
    online KD did not beat CE)."""
    gap = by_name["ce"]["ce"] - by_name[ONLINE]["ce"]
    return (by_name["ce"]["ce"] - by_name[name]["ce"]) / gap if gap > 0 else float("nan")


def percent(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.0f}%"


def paired(seeded: dict, name: str, reference: str) -> str:
    """Mean and standard error over seeds of (this row's CE - the reference's CE), in nats."""
    if name == reference:
        return ""
    differences = [by_name[name]["ce"] - by_name[reference]["ce"] for by_name in seeded.values()]
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    return f"{statistics.mean(differences):+.3f} ± {error:.3f}"


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    seeded = results["seeded"]
    rows = seeded[str(results["seed"])]
    names = list(rows)
    values = [rows[n]["ce"] for n in names]
    others = [(seed, by_name) for seed, by_name in seeded.items() if str(seed) != str(results["seed"])]
    if others:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(8, 4.6))
    colours = ["#999999" if n == "ce" else "#cc6677" if n.startswith("online") else "#4477aa" for n in names]
    ax.barh(names, values, color=colours)
    for y, name in enumerate(names):
        ax.text(values[y] + 0.005, y, f"{values[y]:.3f}", va="center", fontsize=8)
        extra = [by_name[name]["ce"] for _, by_name in others if name in by_name]
        if extra:
            ax.plot(extra, [y] * len(extra), "k|", markersize=10,
                    label="other seeds" if name == "ce" else None)
    every = values + [by_name[n]["ce"] for _, by_name in others for n in by_name]
    ax.set_xlim(min(every) - 0.15, max(every) + 0.08)
    ax.invert_yaxis()
    if others:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("held-out cross-entropy (nats/token), lower is better")
    ax.set_title(f"Students after {results['steps']} steps, bars: seed {results['seed']} "
                 f"(teacher: {results['teacher_heldout_ce']:.3f})", fontsize=10)
    if others:
        paired_names = [n for n in names if n != ONLINE and all(n in by_name for by_name in seeded.values())]
        for y, name in enumerate(paired_names):
            differences = [by_name[name]["ce"] - by_name[ONLINE]["ce"] for by_name in seeded.values()]
            mean = statistics.mean(differences)
            error = statistics.stdev(differences) / math.sqrt(len(differences))
            right.errorbar(mean, y, xerr=error, fmt="o", color="#999999" if name == "ce" else "#4477aa", capsize=4)
            right.text(mean, y - 0.25, f"{mean:+.3f} ± {error:.3f}", ha="center", fontsize=8)
        right.axvline(0.0, color="#cc6677", linewidth=1)
        right.set_yticks(range(len(paired_names)), paired_names)
        right.set_ylim(len(paired_names) - 0.5, -0.8)
        right.set_xlabel("CE minus online KD's CE, same seed (nats)")
        right.set_title(f"Paired by seed, mean ± s.e. over {len(seeded)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run_or_report(main, write_report, "quality")
