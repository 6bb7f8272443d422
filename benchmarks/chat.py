"""Chat distillation benchmark: what a chat store costs, what the teacher job costs, what it buys.

Teacher SmolLM2-135M-Instruct with its own chat template; corpus builtin:python-docs-chat
(softcache.chat_corpus: conversations whose user turns ask about a Python documentation topic and
whose assistant turns are that topic's text; every fifth topic held out). Three measurements:

1. Bytes: the first --sequences packed rows of the training split cached as a chat store (targets
   only at assistant positions, documents kept apart) and as a text store of the same token ids
   (every position a target, one stream), for top-64 and for 50 sampled draws. Bytes per token and
   per teaching position.
2. Speed: on those rows, interleaved rounds of a bare teacher forward with the block-diagonal
   document mask, a bare forward without it, and the cache job into the chat store (the same code
   as `softcache cache`: softcache.cache_job.TeacherJob). Medians and ratios to the masked forward.
3. Quality: students trained on the whole training split's chat store (50 sampled draws, as the
   demo does), one cross-entropy only and one distilled (alpha 0.5), for each seed (same
   initialisation and batches within a seed), evaluated on the held-out split's assistant tokens.
   Differences are paired by seed: mean and standard error.

    python benchmarks/chat.py                      # about an hour on 2 CPU cores (3 seeds)
    python benchmarks/chat.py --parts students     # one part again; the others kept from chat.json
    python benchmarks/chat.py --device cuda        # the teacher on a GPU (students too)

Stores and students under benchmarks/out/chat are reused; delete them to measure again.
Writes benchmarks/results/chat.md (and .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from softcache.cache_job import TeacherJob, load_teacher, pack_corpus
from softcache.config import CacheConfig, TrainConfig
from softcache.demo import STUDENT
from softcache.packing import forward_documents
from softcache.store import open_store
from softcache.train_job import METRICS, run_train

from cache_job import timed_job  # benchmarks/cache_job.py: the same timed teacher pass

HERE = Path(__file__).parent
CORPUS = "builtin:python-docs-chat"


def bare_forward(model, input_ids: np.ndarray, segments: np.ndarray | None, batch_size: int, device) -> None:
    """The teacher's forward over every batch, nothing kept; with ``segments``, each document alone."""
    with torch.inference_mode():
        for lo in range(0, len(input_ids), batch_size):
            ids = torch.from_numpy(input_ids[lo:lo + batch_size].astype(np.int64)).to(device)
            if segments is None:
                model(input_ids=ids, use_cache=False)
            else:
                rows = torch.from_numpy(segments[lo:lo + batch_size]).to(device)
                forward_documents(lambda **inputs: model(use_cache=False, **inputs), ids, rows)
    if device.type == "cuda":
        torch.cuda.synchronize()


def as_text(corpus):
    """The same token ids as one stream: no mask, no documents (what a text store of them holds)."""
    return dataclasses.replace(corpus, teach=None, segments=None)


def store_sizes(path: Path) -> dict:
    store = open_store(path)
    teaching = store.corpus.teaching_positions or store.layout.num_tokens
    return {"bytes_per_token": store.totals.bytes_per_token,
            "bytes_per_teaching_position": store.totals.data_bytes / teaching,
            "teaching_share": teaching / store.layout.num_tokens, "data_bytes": store.totals.data_bytes}


def entries_by_position(work: Path) -> dict:
    """Mean stored entries (unique sampled ids) per position of the sampled text store, at the positions
    that teach in the chat store and at the others: what the two kinds of position cost."""
    text, chat = open_store(work / "bytes-text-sampled50"), open_store(work / "bytes-chat-sampled50")
    lengths = text.read_columns(np.arange(len(text)))["target_lengths"]
    teach = chat.read(0, len(chat))["teach"]
    chat_entries = int(chat.read_columns(np.arange(len(chat)))["target_lengths"].sum())
    return {"text_teaching": float(lengths[teach].mean()), "text_other": float(lengths[~teach].mean()),
            "chat_total": chat_entries, "text_total_at_teaching": int(lengths[teach].sum())}


def student_run(work: Path, train: Path, heldout: Path, name: str, alpha: float, seed: int, args) -> dict:
    """Train (or reuse) one student and return its held-out evaluation and wall time."""
    out = work / "students" / f"{name}-seed{seed}"
    student = work / "student.json"
    student.write_text(json.dumps(STUDENT, indent=2) + "\n")
    config = TrainConfig(store=str(train), student=str(student), out=str(out), steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, alpha=alpha, seed=seed, eval_store=str(heldout),
                         checkpoint_every=max(args.steps // 2, 1), num_workers=0, device=args.device, progress=False,
                         resume=(out / "config.json").exists())
    metrics = out / METRICS
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not (lines and lines[-1]["step"] == args.steps and "eval" in lines[-1]):
        run_train(config)
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    seconds = sum(line["tokens"] / line["tokens_per_s"] for line in lines)
    print(f"{name} seed {seed}: held-out CE {lines[-1]['eval']['ce']:.4f} ({seconds:.0f} s)", flush=True)
    return {**lines[-1]["eval"], "seconds": seconds}


PARTS = ("bytes", "speed", "students")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:smollm2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=48, help="Rows of the bytes and speed comparisons.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=str(HERE / "out" / "chat"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="Measure only these; the others are kept from results/chat.json.")
    parser.add_argument("--report-only", action="store_true", help="Redraw from results/chat.json.")
    args = parser.parse_args()
    work = Path(args.work)
    path = HERE / "results" / "chat.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report_only:
        write_report(results)
        return
    work.mkdir(parents=True, exist_ok=True)

    def config(name: str, split: str = "train", **fields) -> CacheConfig:
        return CacheConfig(teacher=args.teacher, data=CORPUS, split=split, out=str(work / name), seq_len=args.seq_len,
                           batch_size=4, shard_size=16, device=args.device, progress=False, **fields)

    base = config("unused")
    teacher = load_teacher(base)
    train = pack_corpus(base, teacher.tokenizer)
    device = teacher.device
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    results.update({"machine": f"{machine}, torch {torch.__version__}, Python {platform.python_version()}",
                    "teacher": args.teacher, "seq_len": args.seq_len, "train_rows": len(train.input_ids),
                    "train_teaching_share": float(train.teach.mean()),
                    "train_padding_share": train.padding_positions / train.input_ids.size})
    print(f"{args.teacher}: training split {len(train.input_ids):,} rows of {args.seq_len}, "
          f"{train.teach.mean():.1%} of positions teach, {(train.segments.max(1) + 1).mean():.2f} segments per row",
          flush=True)
    subset = dataclasses.replace(train, input_ids=train.input_ids[:args.sequences], teach=train.teach[:args.sequences],
                                 segments=train.segments[:args.sequences])
    if "bytes" in args.parts:  # 1: chat and text stores of the same tokens
        # Independent draws, as the stores of results/chat.md were written (before systematic draws).
        kinds = {"top64": {"targets": "topk", "k": 64},
                 "sampled50": {"targets": "sampled", "samples": 50, "draws": "independent"}}
        sizes = {}
        for shape, corpus in (("chat", subset), ("text", as_text(subset))):
            configs = [config(f"bytes-{shape}-{name}", **fields) for name, fields in kinds.items()]
            timed_job(configs, teacher, corpus)
            sizes[shape] = {name: store_sizes(Path(c.out)) for name, c in zip(kinds, configs)}
        results.update(sizes=sizes, entries=entries_by_position(work), sequences=args.sequences)
        print(json.dumps(sizes, indent=1), flush=True)
    if "speed" in args.parts:  # 2: interleaved rounds on the same rows
        results.update(teacher_speed(teacher, subset, config, args.rounds), speed_sequences=args.sequences,
                       rounds=args.rounds)
    if "students" in args.parts:  # 3: on the whole training split and the held-out split
        stores = {"train": config("train-sampled50", targets="sampled", samples=50, draws="independent"),
                  "heldout": config("heldout-top64", split="heldout", targets="topk", k=64)}
        for split, store_config in stores.items():
            if not ((Path(store_config.out) / "manifest.json").exists() and open_store(store_config.out).complete):
                started = time.perf_counter()
                TeacherJob(store_config, teacher=teacher, corpus=train if split == "train" else None).run()
                print(f"{split} store: {time.perf_counter() - started:.0f} s", flush=True)
        del teacher
        runs = {name: {str(seed): student_run(work, Path(stores["train"].out), Path(stores["heldout"].out), name, alpha,
                                              seed, args)
                       for seed in args.seeds}
                for name, alpha in (("ce", 0.0), ("kd", 0.5))}
        heldout = open_store(stores["heldout"].out)
        results.update(heldout_teaching_positions=heldout.corpus.teaching_positions,
                       teacher_ce=heldout.totals.teacher_ce, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       seeds=args.seeds, students=runs)
    write_report(results)


def teacher_speed(teacher, subset, config, rounds: int) -> dict:
    """Seconds per pass over ``subset`` of each mode, in interleaved rounds, and medians of their ratios to
    the forward with the document mask."""
    model, device = teacher.model, teacher.device
    bare_forward(model, subset.input_ids[:4], subset.segments[:4], 4, device)  # warm-up
    seconds = {"forward, document mask": [], "forward, no mask": [], "cache job, chat store (top-64)": [],
               "cache job, text store of the same tokens (top-64)": []}
    for round_ in range(rounds):
        for mode, segments in (("forward, document mask", subset.segments), ("forward, no mask", None)):
            started = time.perf_counter()
            bare_forward(model, subset.input_ids, segments, 4, device)
            seconds[mode].append(time.perf_counter() - started)
        seconds["cache job, chat store (top-64)"].append(
            timed_job([config("speed-chat", targets="topk", k=64)], teacher, subset)["seconds"])
        seconds["cache job, text store of the same tokens (top-64)"].append(
            timed_job([config("speed-text", targets="topk", k=64)], teacher, as_text(subset))["seconds"])
        print(f"round {round_ + 1}: " + ", ".join(f"{m} {s[-1]:.1f} s" for m, s in seconds.items()), flush=True)
    masked = seconds["forward, document mask"]
    return {"seconds": seconds,
            "median_ratio_to_masked_forward": {mode: statistics.median(s / b for s, b in zip(values, masked))
                                               for mode, values in seconds.items()}}


def paired(results: dict, metric: str) -> tuple[float, float]:
    """Mean and standard error over seeds of kd minus ce for ``metric``."""
    seeds = results["seeds"]
    diffs = [results["students"]["kd"][str(s)][metric] - results["students"]["ce"][str(s)][metric] for s in seeds]
    error = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), error


def write_report(results: dict) -> None:
    """results/chat.json, and chat.md with a section for each part measured so far."""
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "chat.json").write_text(json.dumps(results, indent=2) + "\n")
    padding = f", {results['train_padding_share']:.1%} are padding" if "train_padding_share" in results else ""
    lines = [
        "# Chat distillation: store size, teacher job speed, student quality",
        "",
        f"Teacher {results['teacher']} with its own chat template; corpus `{CORPUS}` (softcache.chat_corpus: "
        "conversations whose user turns ask about a Python documentation topic and whose assistant turns are the "
        "topic's text, two answers per conversation; every fifth topic held out), rendered and packed by `softcache "
        f"cache` (`--packing documents`, `--train-on assistant`) into rows of {results['seq_len']} tokens: "
        f"{results['train_rows']:,} training rows; {results['train_teaching_share']:.1%} of positions teach{padding}. "
        f"{results['machine']}. Produced by `python benchmarks/chat.py`.",
        "",
    ]
    if "sizes" in results:
        lines += _bytes_section(results)
    if "seconds" in results:
        lines += _speed_section(results)
    if "students" in results:
        lines += _students_section(results)
    (out / "chat.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _bytes_section(results: dict) -> list[str]:
    sizes, entries = results["sizes"], results["entries"]
    lines = [f"## Bytes: a chat store vs a text store of the same tokens (first {results['sequences']} rows, padding "
             "included: every position of the text store has a target)", "",
             "| targets | store | bytes/token | bytes per teaching position | positions with targets |",
             "| --- | --- | ---: | ---: | ---: |"]
    for kind in sizes["chat"]:
        for shape in ("chat", "text"):
            row = sizes[shape][kind]
            lines.append(f"| {kind} | {shape} | {row['bytes_per_token']:.1f} | {row['bytes_per_teaching_position']:.1f} "
                         f"| {row['teaching_share']:.1%} |")
    return lines + ["", "The chat store holds targets only where an assistant token follows; its other positions "
                    "cost their token id and a zero length. Its bytes per teaching position are above the text "
                    "store's average because the positions that teach are the uncertain ones: in the sampled text "
                    f"store they keep {entries['text_teaching']:.1f} unique ids on average, the prompt and template "
                    f"positions {entries['text_other']:.1f}. The chat store holds {entries['chat_total']:,} sampled "
                    f"entries, the text store {entries['text_total_at_teaching']:,} at the same positions (its "
                    "contexts run across conversations, so its draws differ a little).", ""]


def _speed_section(results: dict) -> list[str]:
    lines = [f"## Teacher job speed (the first {results['speed_sequences']} rows, {results['rounds']} interleaved "
             "rounds, medians)", "", "| mode | median seconds | / forward with the document mask |",
             "| --- | ---: | ---: |"]
    for mode, values in results["seconds"].items():
        lines.append(f"| {mode} | {statistics.median(values):.1f} | "
                     f"{results['median_ratio_to_masked_forward'][mode]:.2f}x |")
    return lines + [""]


def _students_section(results: dict) -> list[str]:
    seeds = results["seeds"]
    ce_mean, ce_error = paired(results, "ce")
    kl_mean, kl_error = paired(results, "kl")
    lines = [f"## Students: cross-entropy only vs distilled ({len(seeds)} seeds)", "",
             f"The demo's 16 M-parameter Llama (`softcache.demo.STUDENT`), {results['steps']} steps of "
             f"{results['batch_size']} x {results['seq_len']} tokens, lr {results['lr']}; the distilled student uses "
             "alpha 0.5 on the training split's 50-draw sampled chat store. Evaluated on the held-out split's "
             f"{results['heldout_teaching_positions']:,} assistant positions (the teacher's CE there: "
             f"{results['teacher_ce']:.3f}). Differences are paired by seed (same initialisation and batches).", "",
             "| student | held-out CE, seeds " + " / ".join(map(str, seeds)) + " | mean CE | KL to teacher (mean) "
             "| top-1 agreement (mean) | median run |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, label in (("ce", "cross-entropy only"), ("kd", "distilled (sampled N=50)")):
        runs = [results["students"][name][str(s)] for s in seeds]
        ces = " / ".join(f"{r['ce']:.3f}" for r in runs)
        lines.append(f"| {label} | {ces} | {statistics.mean(r['ce'] for r in runs):.3f} | "
                     f"{statistics.mean(r['kl'] for r in runs):.3f} | "
                     f"{statistics.mean(r['top1_agreement'] for r in runs):.3f} | "
                     f"{statistics.median(r['seconds'] for r in runs):.0f} s |")
    return lines + ["", f"Distilled minus cross-entropy only, paired by seed: held-out CE {ce_mean:+.3f} ± "
                    f"{ce_error:.3f} nats, KL to the teacher {kl_mean:+.3f} ± {kl_error:.3f} (mean ± standard "
                    "error; negative is better).", ""]


if __name__ == "__main__":
    main()
