"""Benchmark: the teacher job's peak memory as the corpus grows, and its tokenizer throughput.

The corpus path is what is measured, so the teacher is the test suite's tiny random Llama (tests/conftest.py
``make_teacher``: 2 layers, hidden 32, a byte-level BPE tokenizer of the Python docs). For corpora of
``--tokens`` (default 1M, 10M and 50M tokens: JSON lines of Python-docs paragraphs, each numbered so
that none repeats another), each run is a fresh process under ``/usr/bin/time``:

  first read -- ``read_rows`` on the new file: datasets converts JSON lines to Arrow once, into its
            cache (what a job's first read of a corpus file does); every run below finds it cached;

  job    -- ``softcache cache`` writing the whole corpus (top-8 targets, zarr, rows of 256 tokens,
            shards of 256 rows): its peak resident memory (max RSS) and wall time; only for sizes in
            ``--job-tokens`` (default 1M and 10M: the tiny teacher's job writes about 10k tokens/s here,
            so 50M would take hours);
  corpus -- the job's corpus path without the teacher: the index pass and every shard's rows rebuilt
            and checked (``stream_corpus``, ``StreamedCorpus.shard``), what the job does besides the
            forward passes and writes: peak resident memory and wall time;
  packed -- the corpus packed in memory (``pack_corpus``, what every rank of the job held before it
            streamed): its peak resident memory.

Then, in this process, on the 10M corpus (or the largest below it): the bare fast tokenizer over every
paragraph (batches of 512, as the job calls it) against the job's corpus path without a teacher: the
index pass (``stream_corpus``), and the index pass plus every shard rebuilt (``StreamedCorpus.shard``),
each as a throughput and a ratio to the bare tokenizer; medians of ``--rounds``.

    python benchmarks/corpus_memory.py [--tokens 1000000,10000000,50000000]

Writes benchmarks/results/corpus_memory.md (and .json), or into --results.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny test teacher

from conftest import make_teacher  # noqa: E402

from softcache.cache_job import stream_corpus  # noqa: E402
from softcache.config import CacheConfig  # noqa: E402
from softcache.corpus import python_docs  # noqa: E402

SEQ_LEN, SHARD_SIZE = 256, 256


def write_corpus(path: Path, tokenizer, tokens: int) -> int:
    """Numbered Python-docs paragraphs as JSON lines until ``tokens`` tokens (EOS included); the count."""
    paragraphs = [p for topic in python_docs() for p in topic.split("\n\n") if p.strip()]
    lengths = [len(ids) + 1 for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]]
    number_cost = 4  # "1234. " costs a few tokens; counted roughly, the corpus is only sized by it
    total = 0
    with open(path, "w") as handle:
        copy = 0
        while total < tokens:
            for paragraph, length in zip(paragraphs, lengths):
                handle.write(json.dumps({"text": f"{copy}. {paragraph}"}) + "\n")
                total += length + number_cost
                if total >= tokens:
                    break
            copy += 1
    return total


def timed_child(code: str) -> dict:
    """Run ``python -c code`` under /usr/bin/time: peak RSS (MiB) and wall seconds."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M %e", sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    rss_kib, seconds = done.stderr.strip().splitlines()[-1].split()
    return {"peak_rss_mib": int(rss_kib) / 1024, "seconds": float(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1000000,10000000,50000000")
    parser.add_argument("--job-tokens", default="1000000,10000000", help="sizes at which the whole job runs too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default=str(HERE / "out" / "corpus_memory"))
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teacher = make_teacher(work / "teacher")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    runs, paths = [], {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        data = work / f"corpus-{tokens}.jsonl"
        written = write_corpus(data, tokenizer, tokens)
        settings = dict(teacher=str(teacher), data=str(data), seq_len=SEQ_LEN, k=8, batch_size=64,
                        shard_size=SHARD_SIZE, progress=False)
        convert = timed_child(f"from softcache.corpus import read_rows; read_rows({str(data)!r})")
        job = None
        if str(tokens) in args.job_tokens.split(","):
            job = timed_child(f"from softcache.cache_job import run_cache; from softcache.config import CacheConfig; "
                              f"run_cache(CacheConfig(out={str(work / f'store-{tokens}')!r}, **{settings!r}))")
            shutil.rmtree(work / f"store-{tokens}")
        corpus = timed_child(f"from transformers import AutoTokenizer; from softcache.cache_job import stream_corpus; "
                             f"from softcache.config import CacheConfig; c = stream_corpus(CacheConfig(out='unused', "
                             f"**{settings!r}), AutoTokenizer.from_pretrained({str(teacher)!r})); "
                             f"all(c.shard(f, min({SHARD_SIZE}, c.num_sequences - f)) for f in range(0, c.num_sequences, "
                             f"{SHARD_SIZE}))")  # each shard dropped once built, as the job drops it once written
        packed = timed_child(f"from transformers import AutoTokenizer; from softcache.cache_job import pack_corpus; "
                             f"from softcache.config import CacheConfig; pack_corpus(CacheConfig(out='unused', "
                             f"**{settings!r}), AutoTokenizer.from_pretrained({str(teacher)!r}))")
        runs.append({"tokens": written, "corpus_bytes": data.stat().st_size, "first_read": convert, "job": job,
                     "corpus": corpus, "packed": packed})
        paths[written] = data
        print(runs[-1], flush=True)

    measured = max((r for r in runs if r["tokens"] <= 11_000_000), key=lambda r: r["tokens"], default=runs[0])
    throughput = tokenizer_throughput(paths[measured["tokens"]], teacher, tokenizer, args.rounds)
    results = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "seq_len": SEQ_LEN, "shard_size": SHARD_SIZE, "runs": runs,
        "throughput_corpus_tokens": measured["tokens"], "throughput": throughput,
    }
    write_report(results, Path(args.results))


def tokenizer_throughput(data: Path, teacher: Path, tokenizer, rounds: int) -> dict:
    """Tokens/s of the bare tokenizer, the index pass, and the index pass with every shard rebuilt."""
    texts = [json.loads(line)["text"] for line in open(data)]
    config = CacheConfig(teacher=str(teacher), data=str(data), out="unused", seq_len=SEQ_LEN, shard_size=SHARD_SIZE,
                         progress=False)
    seconds = {"bare": [], "index": [], "index_and_shards": []}
    tokens = 0
    started = time.perf_counter()
    stream_corpus(config, tokenizer)  # the first read also converts the JSON lines to Arrow (datasets' cache)
    cold = time.perf_counter() - started
    for _ in range(rounds):
        started = time.perf_counter()
        tokens = sum(len(ids) + 1 for lo in range(0, len(texts), 512)
                     for ids in tokenizer(texts[lo:lo + 512], add_special_tokens=False)["input_ids"])
        seconds["bare"].append(time.perf_counter() - started)
        started = time.perf_counter()
        corpus = stream_corpus(config, tokenizer)
        seconds["index"].append(time.perf_counter() - started)
        for first in range(0, corpus.num_sequences, SHARD_SIZE):
            corpus.shard(first, min(SHARD_SIZE, corpus.num_sequences - first))
        seconds["index_and_shards"].append(time.perf_counter() - started)
        print({mode: round(s[-1], 2) for mode, s in seconds.items()}, flush=True)
    bare = statistics.median(seconds["bare"])
    return {"cold_index_seconds": cold, **{mode: {"median_seconds": statistics.median(s), "tokens_per_s": tokens / statistics.median(s),
                   "ratio_to_bare": statistics.median(s) / bare} for mode, s in seconds.items()}}


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Teacher job memory as the corpus grows, and its tokenizer throughput",
        "",
        f"The test suite's tiny teacher (the corpus path is what is measured), rows of {results['seq_len']} tokens, "
        f"shards of {results['shard_size']} rows, top-8 targets into zarr; each run a fresh process, peak resident "
        f"memory from /usr/bin/time ({results['machine']}). Produced by `python benchmarks/corpus_memory.py`.",
        "",
        "Peak RSS counts the pages of the memory-mapped Arrow copy of the corpus that were read (file-backed: "
        "the kernel drops them under pressure); the first read's column is datasets converting the JSON lines "
        "into that copy, once per file.",
        "",
        "| corpus tokens | corpus file | first read: peak RSS | job: peak RSS | job: wall time | corpus path alone: "
        "peak RSS | corpus path alone: wall time | packed in memory (before streaming): peak RSS |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        job = (f"{run['job']['peak_rss_mib']:,.0f} MiB | {run['job']['seconds']:,.0f} s" if run["job"]
               else "not run | not run")
        lines.append(f"| {run['tokens'] / 1e6:,.1f} M | {run['corpus_bytes'] / 2**20:,.0f} MiB | "
                     f"{run['first_read']['peak_rss_mib']:,.0f} MiB | {job} | "
                     f"{run['corpus']['peak_rss_mib']:,.0f} MiB | {run['corpus']['seconds']:,.0f} s | "
                     f"{run['packed']['peak_rss_mib']:,.0f} MiB |")
    t = results["throughput"]
    lines += [
        "",
        f"Tokenizer throughput on the {results['throughput_corpus_tokens'] / 1e6:.1f} M-token corpus (medians):",
        "",
        "| | tokens/s | time / bare tokenizer |",
        "| --- | ---: | ---: |",
        f"| bare fast tokenizer, batches of 512 | {t['bare']['tokens_per_s']:,.0f} | 1.00 |",
        f"| the job's index pass (read, tokenize, pack, digest) | {t['index']['tokens_per_s']:,.0f} | "
        f"{t['index']['ratio_to_bare']:.2f} |",
        f"| index pass + every shard rebuilt (all the job's corpus work) | "
        f"{t['index_and_shards']['tokens_per_s']:,.0f} | {t['index_and_shards']['ratio_to_bare']:.2f} |",
        "",
        f"The first index pass over a JSON-lines corpus also has datasets convert it to Arrow once (its cache): "
        f"{t['cold_index_seconds']:.1f} s here, against {t['index']['median_seconds']:.1f} s for a pass that finds "
        "the conversion cached.",
        "",
    ]
    (out / "corpus_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
