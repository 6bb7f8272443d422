"""Sampled targets: bytes per token against quality, systematic draws against independent ones.

Two measurements on the real teacher (SmolLM2-135M-Instruct) and the built-in corpus:

1. The targets' own error, with no student and no seed noise: for each way of sampling, the
   expected squared error sum_v E[(p_hat_v - p_v)^2] of the stored estimate p_hat against the
   teacher's full distribution p, and the expected distinct ids per position, computed exactly from
   the teacher's distribution at every held-out position (N independent draws: (1 - sum p^2) / N;
   N systematic draws: sum f (1 - f) / N^2 with f = frac(N p)). The KD gradient's noise from the
   targets is this error, so two ways of sampling with the same error teach alike.
2. Students, paired by seed (same initialisation and batches), trained on stores that one teacher
   pass writes, each row with its measured bytes per token: cross-entropy only, the reference
   sampled store (N = 50 independent draws, the store benchmarks/quality.py found equal to online
   full-vocabulary KD over five seeds) and systematic stores of fewer draws.

    python benchmarks/sampling.py                   # about 3 hours on 2 CPU cores (5 seeds x 5 rows)
    python benchmarks/sampling.py --seeds 0 1       # fewer seeds
    python benchmarks/sampling.py --finished-only   # report the runs trained (here, or recorded in sampling.json)
    python benchmarks/sampling.py --report-only     # redraw from results/sampling.json

Stores and runs are reused from --work (delete a run's directory to train it again); the reference
store and the held-out store are taken from benchmarks/out/cross_tokenizer when that benchmark wrote
them with the same settings. Writes benchmarks/results/sampling.md, sampling.json and sampling.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

from softcache.cache_job import cache_many, load_teacher, stream_corpus
from softcache.config import DEFAULT_IDS, CacheConfig
from softcache.store import open_store
from softcache.store.convert import convert_store
from softcache.store.zarr_format import DEFAULT_CODEC
from quality import cached_run
from student_runs import pyplot, run_or_report, store_complete, student_benchmark_setup

HERE = Path(__file__).parent
REFERENCE = "independent N=50"
STORES = {  # row name: the store's sampling flags
    REFERENCE: {"samples": 50, "draws": "independent"},
    "systematic N=12": {"samples": 12, "draws": "systematic"},
    "systematic N=16": {"samples": 16, "draws": "systematic"},  # softcache cache's default
    "systematic N=24": {"samples": 24, "draws": "systematic"},  # the default before
}
ERROR_DRAWS = (8, 12, 16, 20, 24, 32, 50, 100)


def store_config(work: Path, name: str, seq_len: int, max_sequences: int | None, split: str = "train",
                 **targets) -> CacheConfig:
    return CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", split=split, out=str(work / name),
                       seq_len=seq_len, batch_size=8, max_sequences=max_sequences, progress=False, **targets)


SAME = ("teacher", "data", "split", "seq_len", "max_sequences", "targets", "k", "samples", "seed", "temperature")


def reuse(work: Path, name: str, other: Path, config: CacheConfig) -> None:
    """Link the cross-tokenizer benchmark's store of the same settings instead of writing it again."""
    link = work / name
    if link.exists() or not (other / "manifest.json").exists():
        return
    manifest = open_store(other).manifest
    wanted = config.targets_section().to_dict()
    if all(manifest["config"].get(key) == getattr(config, key) for key in SAME) and manifest["targets"] == wanted:
        link.symlink_to(other.resolve(), target_is_directory=True)


def write_stores(work: Path, seq_len: int, max_sequences: int | None) -> dict:
    """Every training store (one teacher pass for those missing) and the held-out top-64 store."""
    other = HERE / "out" / "cross_tokenizer"
    configs = {name: store_config(work, f"{name.replace(' ', '-').replace('=', '')}-train", seq_len, max_sequences,
                                  targets="sampled", **flags) for name, flags in STORES.items()}
    heldout = store_config(work, "top64-heldout", seq_len, max_sequences, split="heldout", targets="topk", k=64)
    if max_sequences is None:
        reuse(work, Path(configs[REFERENCE].out).name, other / "train-store", configs[REFERENCE])
        reuse(work, "top64-heldout", other / "heldout-store", heldout)
    record = work / "teacher_pass.json"
    passes = json.loads(record.read_text()) if record.exists() else []
    missing = [c for c in configs.values() if not store_complete(c.out)]
    if missing:
        results = cache_many(missing)
        passes.append({"stores": [Path(c.out).name for c in missing], "seconds": results[0].seconds})
        record.write_text(json.dumps(passes))
    if not store_complete(heldout.out):
        cache_many([heldout])
    return {"configs": configs, "heldout": Path(heldout.out), "passes": passes}


def target_error(heldout: CacheConfig, sequences: int = 16) -> dict:
    """Expected squared error and distinct ids per position of each way of sampling, exactly, over the
    teacher's distributions at ``sequences`` held-out sequences."""
    teacher = load_teacher(heldout)
    corpus = stream_corpus(dataclasses.replace(heldout, max_sequences=sequences), teacher.tokenizer)
    rows = corpus.shard(0, corpus.num_sequences)[0]
    sums = {}
    positions = 0
    with torch.inference_mode():
        for lo in range(0, len(rows), 4):
            ids = torch.from_numpy(rows[lo:lo + 4].astype(np.int64)).to(teacher.device)
            logits = teacher.model(input_ids=ids, use_cache=False).logits
            for chunk in logits.reshape(-1, logits.shape[-1]).split(128):
                p = torch.softmax(chunk.double(), -1)
                squares = (p * p).sum(-1)
                positions += len(p)
                for n in ERROR_DRAWS:
                    fraction = torch.frac(n * p)
                    for draws, error, distinct in (
                            ("independent", (1 - squares) / n, -torch.expm1(n * torch.log1p(-p)).sum(-1)),
                            ("systematic", (fraction * (1 - fraction)).sum(-1) / n ** 2,
                             torch.clamp(n * p, max=1).sum(-1))):
                        total = sums.setdefault(f"{draws} N={n}", [0.0, 0.0])
                        total[0] += float(error.sum())
                        total[1] += float(distinct.sum())
    return {"positions": positions,
            "rows": {name: {"error": e / positions, "distinct": d / positions} for name, (e, d) in sums.items()}}


def main() -> None:
    args, work, student_config = student_benchmark_setup(
        __doc__, "every row is trained with each seed", HERE / "out" / "sampling",
        lambda parser: parser.add_argument("--finished-only", action="store_true",
                                           help="report the runs already trained; train nothing"))
    stores = write_stores(work, args.seq_len, args.max_sequences)
    error_file = work / "target_error.json"
    if not error_file.exists():
        error_file.write_text(json.dumps(target_error(store_config(work, "unused", 512, None, split="heldout"),
                                                      16 if args.max_sequences is None else 2)))
    # CE-only last: a seed stopped part-way still pairs the stores with each other.
    plan = [(name, config, args.alpha) for name, config in stores["configs"].items()] + [
        ("ce", stores["configs"][REFERENCE], 0.0)]
    seeded = {}
    recorded_file = HERE / "results" / "sampling.json"  # runs trained on another machine, kept when reporting
    recorded = json.loads(recorded_file.read_text()).get("seeded", {}) if recorded_file.exists() else {}
    for seed in args.seeds:  # seed by seed, so that a stopped run leaves whole seeds to report
        for name, config, alpha in plan:
            out = work / f"{name.replace(' ', '-').replace('=', '')}-seed{seed}"
            if args.finished_only and not (out / "final").is_dir():
                if name in recorded.get(str(seed), {}):
                    seeded.setdefault(str(seed), {})[name] = recorded[str(seed)][name]
                continue
            row = cached_run(Path(config.out), stores["heldout"], student_config, out, args.steps, args.batch_size,
                             args.lr, seed, alpha, None)
            row["bytes_per_token"] = None if alpha == 0 else open_store(config.out).manifest["totals"]["bytes_per_token"]
            seeded.setdefault(str(seed), {})[name] = row
            print(seed, name, f"CE {row['ce']:.4f}", flush=True)
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "steps": args.steps, "alpha": args.alpha, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "lr": args.lr, "seeds": args.seeds, "teacher_passes": stores["passes"],
        "train_tokens": open_store(stores["configs"][REFERENCE].out).layout.num_tokens,
        "stores": {name: {**STORES[name], "bytes_per_token": default_codec_bytes(Path(c.out), work),
                          "as_written": {"codec": open_store(c.out).manifest["storage"].get("codec"),
                                         "ids": open_store(c.out).manifest["encoding"]["ids"],
                                         "bytes_per_token": open_store(c.out).manifest["totals"]["bytes_per_token"]},
                          "entries_per_position": entries(c.out)} for name, c in stores["configs"].items()},
        "target_error": json.loads(error_file.read_text()),
        "seeded": seeded,
    }
    write_report(results)


def written_by_default(manifest: dict) -> bool:
    """Whether a store's manifest says it is as ``softcache cache`` writes by default: zarr, its default
    codec and id code."""
    return (manifest["storage"]["format"] == "zarr" and manifest["storage"]["codec"] == DEFAULT_CODEC
            and manifest["encoding"]["ids"] == DEFAULT_IDS["zarr"])


def default_codec_bytes(root: Path, work: Path) -> float:
    """Bytes per token of the store ``root`` as ``softcache cache`` writes it by default (zarr, its default
    codec and id code): the store's own figure, or that of a copy rewritten so (the same content, checked by
    digest) when it was written otherwise."""
    manifest = open_store(root).manifest
    if written_by_default(manifest):
        return manifest["totals"]["bytes_per_token"]
    copy = work / f"{root.name}-default-codec"
    if not (copy / "manifest.json").exists() or not written_by_default(open_store(copy).manifest):
        shutil.rmtree(copy, ignore_errors=True)
        convert_store(root, copy, "zarr", ids=DEFAULT_IDS["zarr"])
    return open_store(copy).manifest["totals"]["bytes_per_token"]


def entries(root: str) -> float:
    store = open_store(root)
    lengths = [store.read_columns(np.arange(first, min(first + 64, len(store))))["target_lengths"]
               for first in range(0, len(store), 64)]
    return float(np.concatenate(lengths).mean())


def paired(seeded: dict, name: str, reference: str) -> tuple[float, float]:
    """Mean of this row's CE minus the reference's over the seeds that trained both, and its standard
    error (NaN with one such seed)."""
    differences = [rows[name]["ce"] - rows[reference]["ce"] for rows in seeded.values()
                   if name in rows and reference in rows]
    if not differences:
        return math.nan, math.nan
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return statistics.mean(differences), error


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(results, indent=2) + "\n")
    seeded, stores, error = results["seeded"], results["stores"], results["target_error"]
    names = ["ce", *stores]
    seeds = " / ".join(seeded)
    lines = [
        "# Sampled targets: bytes per token against quality",
        "",
        f"Teacher SmolLM2-135M-Instruct on builtin:python-docs; CPU: {results['machine']}. "
        "Produced by `python benchmarks/sampling.py`.",
        "",
        "## The targets' own error (no student, no seed noise)",
        "",
        f"Expected squared error sum_v E[(p_hat_v - p_v)^2] of each way of sampling against the teacher's full "
        f"distribution, and expected distinct ids per position, computed exactly at {error['positions']:,} held-out "
        f"positions. {matching(error['rows'])}",
        "",
        "| draws | N | squared error | distinct ids / position |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in sorted(error["rows"].items(), key=lambda item: (item[0].split()[0], int(item[0].split("=")[1]))):
        draws, n = name.split(" N=")
        lines.append(f"| {draws} | {n} | {row['error']:.4f} | {row['distinct']:.2f} |")
    lines += [
        "",
        "## Students",
        "",
        f"A 16 M-parameter Llama student (`softcache.demo.STUDENT`), {results['steps']} steps of "
        f"{results['batch_size']} x {results['seq_len']} tokens, lr {results['lr']}, alpha {results['alpha']} for "
        f"every KD row, over {results['train_tokens']:,} training tokens; held-out CE on the top-64 held-out store. "
        f"Seeds {seeds}: each seed is another initialisation and batch order, the same for every row. Differences "
        "are paired by seed, in nats, negative is better, mean ± standard error over the seeds. Bytes per token "
        "are those of each store written with the zarr default codec (input ids included).",
        "",
        f"| student | bytes/token | ids / position | held-out CE, seeds {seeds} | mean CE | minus CE-only's "
        f"| minus {REFERENCE}'s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        ces = [rows[name]["ce"] for rows in seeded.values() if name in rows]
        size = f"{stores[name]['bytes_per_token']:.1f}" if name in stores else ""
        ids = f"{stores[name]['entries_per_position']:.2f}" if name in stores else ""
        versus = [("", "") if name == reference else paired(seeded, name, reference) for reference in ("ce", REFERENCE)]
        cells = ["" if mean == "" or math.isnan(mean) else f"{mean:+.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")
                 for mean, se in versus]
        shown = " / ".join(f"{rows[name]['ce']:.3f}" if name in rows else "-" for rows in seeded.values())
        mean_ce = f"{statistics.mean(ces):.3f}" if ces else ""
        lines.append(f"| {name} | {size} | {ids} | {shown} | {mean_ce} | {cells[0]} | {cells[1]} |")
    rewritten = [(name, store) for name, store in stores.items() if "as_written" in store and (
        store["as_written"]["codec"] != DEFAULT_CODEC or store["as_written"].get("ids", "delta") != DEFAULT_IDS["zarr"])]
    if rewritten:
        lines += ["", "The bytes per token above are the stores' as `softcache cache` writes them now (rewritten with "
                      f"the default codec, {DEFAULT_CODEC}, and the default id code, {DEFAULT_IDS['zarr']}; the same "
                      "content, checked by digest). As their teacher pass wrote them: " + "; ".join(
            f"{name} {store['as_written']['bytes_per_token']:.2f} bytes/token with {store['as_written']['codec']} "
            f"and {store['as_written'].get('ids', 'delta')} ids "
            f"({store['bytes_per_token'] / store['as_written']['bytes_per_token'] - 1:+.1%} now)"
            for name, store in rewritten) + "."]
    errors = [paired(seeded, name, REFERENCE)[1] for name in stores if name != REFERENCE]
    errors = [error for error in errors if not math.isnan(error)]
    if errors:
        lines += ["", f"The paired differences' standard errors here are {min(errors):.3f} to {max(errors):.3f} "
                      f"nats: with {len(seeded)} seeds this regime resolves a difference of about "
                      f"{2 * max(errors):.2f} nats (two standard errors) between two stores."]
    lines += ["", "![bytes per token against held-out CE](sampling.png)", ""]
    (out / "sampling.md").write_text("\n".join(lines))
    plot(results, out / "sampling.png")
    print("\n".join(lines))


def matching(rows: dict) -> str:
    """A sentence: the fewest systematic draws with no more error than 50 independent ones."""
    reference = rows[REFERENCE]
    fewer = [(int(name.split("=")[1]), row) for name, row in rows.items()
             if name.startswith("systematic") and row["error"] <= reference["error"]]
    if not fewer:
        return ""
    n, row = min(fewer, key=lambda item: item[0])
    return (f"{n} systematic draws have no more error than 50 independent ones ({row['error']:.4f} against "
            f"{reference['error']:.4f}) with {row['distinct']:.1f} distinct ids per position instead of "
            f"{reference['distinct']:.1f}.")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    seeded, stores = results["seeded"], results["stores"]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for number, (name, store) in enumerate(stores.items()):
        mean, se = paired(seeded, name, "ce")
        if math.isnan(mean):
            continue
        colour = "#cc6677" if name == REFERENCE else "#4477aa"
        ax.errorbar(store["bytes_per_token"], mean, yerr=None if math.isnan(se) else se, fmt="o", color=colour,
                    capsize=4)
        ax.annotate(name, (store["bytes_per_token"], mean), textcoords="offset points",  # neighbours above and below
                    xytext=(6, 6 if number % 2 else -12), fontsize=8)
    ax.axhline(0.0, color="#999999", linewidth=1, label="cross-entropy only")
    ax.axvline(16.0, color="#dddddd", linewidth=1, linestyle="--", label="16 bytes/token")
    ax.set_xlabel("bytes per token of the store")
    ax.set_ylabel("held-out CE minus CE-only's, paired by seed (nats)")
    with_ce = sum("ce" in rows for rows in seeded.values())
    ax.set_title(f"Mean ± s.e. over the {with_ce} seed(s) with a CE-only run; lower is better", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run_or_report(main, write_report, "sampling")
