"""Benchmark: the teacher loop's target extraction alone, and where its time goes.

One batch of the teacher's real logits (SmolLM2-135M-Instruct on the built-in corpus, 4 x 512
positions, vocab 49,152), computed once; then each kind's extraction from it (the function the job
calls, softcache.kinds), repeated, medians. The largest operations of each come from torch's
profiler over the same calls. The teacher job's own figure (extraction seconds per 1,000 tokens, with
the rest of the job running beside it) is in cache_job.md.

    python benchmarks/extraction.py               # about a minute on 2 CPU cores

Writes benchmarks/results/extraction.md (and .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from softcache.cache_job import load_teacher, pack_corpus
from softcache.config import CacheConfig

HERE = Path(__file__).parent
KINDS = {  # name: CacheConfig fields (the job's own targets section is built from them)
    "top-64": {"targets": "topk", "k": 64},
    "top-p 0.95, at most 64": {"targets": "topp", "k": 64, "top_p": 0.95},
    "sampled N = 16, systematic (default)": {"targets": "sampled", "samples": 16},
    "sampled N = 50, independent": {"targets": "sampled", "samples": 50, "draws": "independent"},
}


def timed(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def largest_ops(call, count: int = 6) -> list[dict]:
    """The operations that took the most CPU time over three calls (torch's profiler), per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            call()
    ops = sorted(prof.key_averages(), key=lambda op: op.self_cpu_time_total, reverse=True)[:count]
    return [{"op": op.key, "ms": op.self_cpu_time_total / 3 / 1000, "calls": op.count // 3} for op in ops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:smollm2")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    setup = CacheConfig(teacher=args.teacher, data="builtin:python-docs", out=str(HERE / "out" / "unused"),
                        seq_len=512, max_sequences=4, device="cpu", progress=False)
    teacher = load_teacher(setup)
    ids = torch.from_numpy(pack_corpus(setup, teacher.tokenizer).input_ids[:4].astype("int64"))
    with torch.inference_mode():
        logits = teacher.model(input_ids=ids, use_cache=False).logits.float().contiguous()
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    tokens = ids.numel()
    rows = []
    for name, fields in KINDS.items():
        section = dataclasses.replace(setup, **fields).targets_section()

        def call(section=section):
            return section.spec.extract(logits, labels, section, first_sequence=0)

        call()  # warm-up
        seconds = timed(call, args.repeats)
        rows.append({"kind": name, "ms_per_batch": seconds * 1000, "seconds_per_1000_tokens": seconds / tokens * 1000,
                     "largest_ops": largest_ops(call)})
        print(rows[-1]["kind"], f"{rows[-1]['ms_per_batch']:.1f} ms", flush=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"torch {torch.__version__}",
               "teacher": args.teacher, "batch": list(logits.shape), "repeats": args.repeats, "rows": rows}
    write_report(results)


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "extraction.json").write_text(json.dumps(results, indent=2) + "\n")
    batch = results["batch"]
    lines = ["# Target extraction alone", "",
             f"Teacher {results['teacher']}'s logits for one batch of {batch[0]} x {batch[1]} positions, vocab "
             f"{batch[2]:,} ({results['machine']}); each kind's extraction {results['repeats']} times, medians. "
             "Produced by `python benchmarks/extraction.py`.", "",
             "| kind | ms / batch | s / 1k tokens | largest operations (ms per batch, torch's profiler) |",
             "| --- | ---: | ---: | --- |"]
    for row in results["rows"]:
        ops = ", ".join(f"{op['op'].removeprefix('aten::')} {op['ms']:.1f}" for op in row["largest_ops"])
        lines.append(f"| {row['kind']} | {row['ms_per_batch']:.1f} | {row['seconds_per_1000_tokens']:.3f} | {ops} |")
    lines.append("")
    (out / "extraction.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
