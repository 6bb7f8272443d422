"""Benchmark: the teacher job's cost over a bare teacher forward, and bytes per token.

One process, one loaded teacher, the same packed batches. Each round runs, back to back:
  bare   -- model(input_ids).logits for every batch, nothing kept;
  zarr   -- the cache job's teacher loop (top-k, device-to-host, background writer) into a zarr store;
  zarr, packed -- the same, given the corpus packed in memory (as the job read it before it streamed),
            so that what streaming the corpus costs the job is a ratio of the same round;
  arrow  -- the same into an arrow store;
  topp   -- top-p targets (p 0.95, at most k ids) into zarr;
  sampled -- the cache job into zarr stores of sampled targets: 16 systematic draws per position
            (softcache cache's default), and 50 independent ones (how sampled stores drew before).
Every job runs between two bare forwards, and its ratio is to their mean, so that a machine whose
speed drifts moves the job and its reference alike; rounds repeat the sequence and medians over
rounds are reported.

Two ratios per job. The whole pass's, and the steady state's: the time from one batch's forward to
the next, averaged over the pass (from the first batch's start to the last's), which is what a job of
thousands of batches converges to. What the whole pass spends beyond its batches at that pace is the
job's fixed cost, reported in seconds: starting its threads and waiting for the first shard's rows,
then, after the last forward, that batch's targets and writing the last shard, which no later forward
overlaps. (The kept output layer's probe runs when the job loads its teacher, as in `softcache cache`,
outside the timed pass.)

Then the zarr store's content is rewritten with other codecs (same data, checked by content digest)
to compare bytes per token and read throughput. The stores use the default target encoding; every
encoding's size and fidelity is in benchmarks/encodings.py.

    python benchmarks/cache_job.py                # SmolLM2-135M-Instruct, CPU, ~50 minutes at 300 tokens/s
    python benchmarks/cache_job.py --rounds 6 --sequences 64
    python benchmarks/cache_job.py --device cuda  # on a GPU machine (writes cache_job_cuda.*)

The jobs are softcache.cache_job.TeacherJob, the object `softcache cache` runs, given the loaded
teacher and the streamed corpus's index (softcache.cache_job.stream_corpus, as the job makes it), so
that the teacher pass, the writes and the rebuilding of each shard's rows from the corpus (what
the job does while the teacher runs) are timed, and the loading and the index pass are not. The
bare forward runs on those same rows, rebuilt once before the rounds.

Writes benchmarks/results/cache_job.md (and .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from softcache.cache_job import TeacherJob, load_teacher, pack_corpus, stream_corpus
from softcache.config import CacheConfig
from softcache.errors import SoftcacheError
from softcache.store import open_store
from softcache.store.convert import convert_store

HERE = Path(__file__).parent
MODES = {  # mode: (label, CacheConfig fields); "packed" is given the corpus packed in memory
    "zarr": ("zarr, top-64", {}),
    "packed": ("zarr, top-64, corpus packed in memory (before streaming)", {}),
    "arrow": ("arrow, top-64", {"format": "arrow"}),
    "topp": ("zarr, top-p 0.95, at most 64 ids", {"targets": "topp", "top_p": 0.95}),
    "sampled16": ("zarr, sampled N = 16, systematic (the default)", {"targets": "sampled", "samples": 16}),
    "independent50": ("zarr, sampled N = 50, independent (the draws before)",
                      {"targets": "sampled", "samples": 50, "draws": "independent"}),
}
CODECS = [
    ("zarr", {"name": "none"}),
    ("zarr", {"name": "zstd", "level": 1}),
    ("zarr", {"name": "zstd", "level": 3}),
    ("zarr", {"name": "zstd", "level": 9}),
    ("zarr", {"name": "blosc", "cname": "zstd", "level": 3, "shuffle": "shuffle"}),
    ("zarr", {"name": "blosc", "cname": "zstd", "level": 9, "shuffle": "shuffle"}),
    ("zarr", {"name": "blosc", "cname": "lz4", "level": 5, "shuffle": "shuffle"}),
    ("arrow", None),
]


class BatchClock:
    """The start of every forward pass of ``model`` (a pre-hook): the steady pace of a pass."""

    def __init__(self, model):
        self.starts: list[float] = []
        model.register_forward_pre_hook(lambda module, args: self.starts.append(time.perf_counter()))

    def step(self) -> float:
        """Seconds from one batch's forward to the next, averaged over the pass since the last reset."""
        return (self.starts[-1] - self.starts[0]) / (len(self.starts) - 1)


def bare_forward(model, input_ids: np.ndarray, batch_size: int, device: torch.device) -> None:
    with torch.inference_mode():
        for lo in range(0, len(input_ids), batch_size):
            ids = torch.from_numpy(input_ids[lo:lo + batch_size].astype(np.int64)).to(device)
            model(input_ids=ids, use_cache=False).logits  # noqa: B018 -- the work being timed
    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_job(teacher, corpus, base: CacheConfig, out: Path, clock: BatchClock | None = None, **targets) -> dict:
    """One teacher job's pass and writes into a new store at ``out`` (setup not timed): see :func:`timed_job`."""
    return timed_job([dataclasses.replace(base, out=str(out), **targets)], teacher, corpus, clock)


def timed_job(configs: list[CacheConfig], teacher, corpus, clock: BatchClock | None = None) -> dict:
    """One teacher pass writing ``configs``' stores afresh (loading and opening not timed): its wall
    ``seconds``, the process's ``cpu_seconds`` (every thread), the job's own ``stats`` and, given the
    teacher's ``clock``, its steady ``step`` (seconds per batch)."""
    for config in configs:
        shutil.rmtree(config.out, ignore_errors=True)
    with TeacherJob(configs, teacher=teacher, corpus=corpus) as job:
        job.load()
        job.open_stores()
        if clock is not None:
            clock.starts.clear()
        started, cpu = time.perf_counter(), time.process_time()
        job.write()
        job.finish()
        timed = {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu, **job.stats}
        return timed if clock is None else {**timed, "step": clock.step()}


class TimedShards:
    """A streamed corpus whose shard rebuilds (the job's own corpus work during the pass, in a background
    thread) are timed: the cost of streaming measured directly, free of the machine's noise between passes."""

    def __init__(self, corpus):
        self.corpus, self.seconds = corpus, []

    def __getattr__(self, name):
        return getattr(self.corpus, name)

    def shard(self, first: int, count: int):
        started = time.perf_counter()
        rows = self.corpus.shard(first, count)
        self.seconds.append(time.perf_counter() - started)
        return rows


def read_throughput(root: Path, repeats: int = 3) -> float:
    """Tokens per second of Store.read over the whole store (decoded to int64/float32)."""
    times = []
    for _ in range(repeats):
        store = open_store(root)
        started = time.perf_counter()
        for first in range(0, len(store), 4):
            store.read(first, min(first + 4, len(store)))
        times.append(time.perf_counter() - started)
    return store.layout.num_tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:smollm2")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--work", default=str(HERE / "out"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the teacher's dtype: --dtype auto)")
    args = parser.parse_args()
    work = Path(args.work)

    def enough_batches(sequences: int) -> None:
        if -(-sequences // args.batch_size) < 3:
            parser.error(f"--sequences {sequences}: at least 3 batches of --batch-size {args.batch_size} a pass "
                         "(the corpus's sequences, if fewer), to tell the steady pace from the fixed cost")

    base = CacheConfig(teacher=args.teacher, data="builtin:python-docs", out=str(work / "unused"), seq_len=args.seq_len,
                       max_sequences=args.sequences, targets="topk", k=args.k, batch_size=args.batch_size, shard_size=args.shard_size,
                       device=args.device, progress=False)
    try:
        base.validate()
    except SoftcacheError as err:
        parser.error(str(err))
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    enough_batches(args.sequences)
    teacher = load_teacher(base)
    corpus = TimedShards(stream_corpus(base, teacher.tokenizer))
    input_ids = np.concatenate([corpus.shard(first, min(args.shard_size, corpus.num_sequences - first))[0]
                                for first in range(0, corpus.num_sequences, args.shard_size)])
    model, device = teacher.model, teacher.device
    tokens = input_ids.size
    print(f"{args.teacher}: {tokens:,} tokens per pass, {args.rounds} rounds, torch threads {torch.get_num_threads()}")

    bare_forward(model, input_ids[: args.batch_size], args.batch_size, device)  # warm-up
    clock = BatchClock(model)
    enough_batches(len(input_ids))  # a corpus shorter than --sequences
    batches = -(-len(input_ids) // args.batch_size)
    packed = pack_corpus(base, teacher.tokenizer)
    assert np.array_equal(packed.input_ids, input_ids), "the streamed shards are the packed rows"
    runs = {mode: [] for mode in ("bare", *MODES)}  # per round: seconds, cpu_seconds and the job's stats
    around = {mode: [] for mode in MODES}  # per round: the mean of the bare passes just before and after the job
    rebuild = []  # seconds of the zarr job's shard rebuilds, per round

    def bare() -> dict:
        clock.starts.clear()
        started, cpu = time.perf_counter(), time.process_time()
        bare_forward(model, input_ids, args.batch_size, device)
        return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu, "step": clock.step()}

    for round_ in range(args.rounds):
        # Every job runs between two bare passes and is compared with their mean: a machine whose speed drifts
        # during a round (a neighbour starting, the CPU's clock) moves a job and its reference alike.
        # The streamed and packed jobs swap places every round: the one run second ran ~3% faster in either
        # order on this machine, as large as the difference being measured.
        order = list(MODES) if round_ % 2 == 0 else ["packed", "zarr", *list(MODES)[2:]]
        before = bare()
        runs["bare"].append(before)
        for mode in order:
            corpus.seconds.clear()
            runs[mode].append(cache_job(teacher, packed if mode == "packed" else corpus, base, work / f"job-{mode}",
                                        clock, **MODES[mode][1]))
            if mode == "zarr":
                rebuild.append(sum(corpus.seconds))
            after = bare()
            runs["bare"].append(after)
            around[mode].append({key: (before[key] + after[key]) / 2 for key in ("seconds", "cpu_seconds", "step")})
            before = after
        print(f"round {round_ + 1}: " + ", ".join(f"{m} {r[-1]['seconds']:.1f} s" for m, r in runs.items()), flush=True)
    seconds = {m: [r["seconds"] for r in rs] for m, rs in runs.items()}
    round_ratios = {m: [r["seconds"] / b["seconds"] for r, b in zip(runs[m], around[m])] for m in MODES}
    ratios = {m: statistics.median(r) for m, r in round_ratios.items()}
    round_step_ratios = {m: [r["step"] / b["step"] for r, b in zip(runs[m], around[m])] for m in MODES}
    step_ratios = {m: statistics.median(r) for m, r in round_step_ratios.items()}
    fixed_seconds = {m: statistics.median(r["seconds"] - batches * r["step"] for r in runs[m]) for m in runs}
    cpu_ratios = {m: statistics.median(r["cpu_seconds"] / b["cpu_seconds"] for r, b in zip(runs[m], around[m]))
                  for m in MODES}
    per_1000 = {m: {key: statistics.median(r[key] for r in runs[m]) / tokens * 1000
                    for key in ("targets_seconds", "writer_cpu_seconds")} for m in MODES}
    streamed_to_packed = statistics.median(s / p for s, p in zip(seconds["zarr"], seconds["packed"]))

    storage = []
    for format_name, codec in CODECS:
        out = work / f"codec-{format_name}-{json.dumps(codec, sort_keys=True) if codec else 'none'}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        manifest = convert_store(work / "job-zarr", out, format_name, codec=codec)
        write_seconds = time.perf_counter() - started
        storage.append({"format": format_name, "codec": manifest["storage"]["codec"],
                        "bytes_per_token": manifest["totals"]["bytes_per_token"],
                        "write_tokens_per_s": tokens / write_seconds, "read_tokens_per_s": read_throughput(out)})
        print(storage[-1], flush=True)

    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    results = {
        "device": device.type,
        "machine": f"{machine}, torch {torch.__version__}, Python {platform.python_version()}",
        "teacher": args.teacher, "tokens_per_pass": tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "k": args.k, "rounds": args.rounds, "seconds": seconds, "runs": runs,
        "median_seconds": {m: statistics.median(s) for m, s in seconds.items()},
        "batches_per_pass": batches, "median_ratio_to_bare": ratios, "median_step_ratio_to_bare": step_ratios,
        "round_step_ratios_to_bare": round_step_ratios,
        "median_fixed_seconds": fixed_seconds, "round_ratios_to_bare": round_ratios, "median_cpu_ratio_to_bare": cpu_ratios, "per_1000_tokens": per_1000,
        "modes": {m: label for m, (label, _) in MODES.items()}, "median_streamed_to_packed": streamed_to_packed,
        "rebuild_seconds": rebuild, "storage": storage,
        "encoding": open_store(work / "job-zarr").manifest["encoding"],
    }
    write_report(results)


def _codec_name(codec: dict) -> str:
    if codec["name"] == "blosc":
        return f"blosc {codec['cname']}-{codec['level']} + byte shuffle"
    return codec["name"] + (f"-{codec['level']}" if "level" in codec else "")


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = "cache_job" if results.get("device", "cpu") == "cpu" else f"cache_job_{results['device']}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    med = results["median_seconds"]
    tokens = results["tokens_per_pass"]
    lines = [
        "# Teacher job vs bare teacher forward",
        "",
        f"Teacher {results['teacher']} on {results.get('device', 'cpu').upper()} ({results['machine']}); "
        f"{tokens:,} tokens per pass "
        f"(seq_len {results['seq_len']}, batch {results['batch_size']}, k {results['k']}), "
        + (f"{results['batches_per_pass']} batches a pass, " if "batches_per_pass" in results else "") +
        f"{results['rounds']} interleaved rounds, medians. Produced by `python benchmarks/cache_job.py`.",
        "",
        "Each job runs between two bare forwards; its ratio is to their mean, the median over rounds (the range "
        "over rounds beside it): of the whole pass's wall time; of the steady state's, the time from one "
        "batch's forward to the next averaged over the pass, which a job of thousands of batches converges to; "
        "and of the process's CPU time (every thread), which a busy neighbour on a shared machine disturbs less. "
        "The job's fixed cost is what its pass spends beyond its batches at the steady pace: starting, then "
        "the last batch's targets and the last shard's write, which no later forward overlaps. "
        "Besides the forward, per 1,000 tokens (medians): the targets' extraction in the teacher loop (wall "
        "seconds), and the background writer's CPU seconds (host copies, encoding, compression, checksums, "
        "writes), the figures that carry over to a machine with more cores or a GPU.",
        "",
    ]
    steady = "median_step_ratio_to_bare" in results  # runs before the steady-state columns lack them
    lines += [
        "| mode | median s / pass | tokens/s | wall ratio to bare forward | range over rounds "
        + ("| steady-state ratio | range over rounds | fixed s / job " if steady else "")
        + "| CPU-time ratio | targets s / 1k tokens | writer CPU s / 1k tokens |",
        "| --- " + "| ---: " * (10 if steady else 7) + "|",
        f"| bare forward | {med['bare']:.2f} | {tokens / med['bare']:,.0f} | 1.000 | | "
        + (f"1.000 | | {results['median_fixed_seconds']['bare']:.2f} | " if steady else "") + "1.000 | | |",
    ]
    for mode, label in results.get("modes", {}).items():
        cost = results["per_1000_tokens"][mode]
        spread = results["round_ratios_to_bare"][mode]
        row = (f"| cache job, {label} | {med[mode]:.2f} | {tokens / med[mode]:,.0f} | "
               f"{results['median_ratio_to_bare'][mode]:.3f} | {min(spread):.3f}-{max(spread):.3f} | ")
        if steady:
            steps = results["round_step_ratios_to_bare"][mode]
            row += (f"{results['median_step_ratio_to_bare'][mode]:.3f} | {min(steps):.3f}-{max(steps):.3f} | "
                    f"{results['median_fixed_seconds'][mode]:.2f} | ")
        lines.append(row + f"{results['median_cpu_ratio_to_bare'][mode]:.3f} | "
                     f"{cost['targets_seconds']:.3f} | {cost['writer_cpu_seconds']:.4f} |")
    if "median_streamed_to_packed" in results:
        rebuilt = statistics.median(results["rebuild_seconds"])
        lines += ["", f"The corpus work of the streaming job, timed inside it: its shards' rows rebuilt from the "
                      f"corpus took {rebuilt:.2f} s a pass (median), {rebuilt / med['zarr']:.1%} of the pass, in a "
                      "thread beside the teacher.",
                  "", f"The job streaming its corpus against the same job given it packed in memory, median of the "
                      f"rounds' ratios: {results['median_streamed_to_packed']:.3f}. Per round (s): "
                      + "; ".join(f"zarr {z:.1f}, packed {p:.1f}" for z, p in
                                  zip(results["seconds"]["zarr"], results["seconds"]["packed"])) + "."]
    lines += [
        "",
        f"## Bytes per token and read throughput (same content: top-{results['k']}, ids "
        f"{results['encoding']['ids']}, values {results['encoding']['values']})",
        "",
        "| format | codec | bytes/token | write tokens/s | read tokens/s (Store.read, decoded) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in results["storage"]:
        lines.append(f"| {row['format']} | {_codec_name(row['codec'])} | {row['bytes_per_token']:.1f} | "
                     f"{row['write_tokens_per_s']:,.0f} | {row['read_tokens_per_s']:,.0f} |")
    lines += ["", "Every target kind and encoding, with its fidelity: [encodings.md](encodings.md).", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
