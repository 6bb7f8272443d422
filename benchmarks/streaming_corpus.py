"""Benchmark: what --streaming costs in reading, and what a shard's cursor costs to resume from.

A JSON-lines file of paragraphs of the Python docs (200,000 rows by default) is read through
softcache.corpus with --streaming (datasets' IterableDataset, each row with the stream's state
before it: the place a cursor holds) and, for the cost of keeping those states, through the bare
IterableDataset. Then the time to a corpus's first row, from its start and from the place of a row
90% of the way in (what rebuilding a late shard pays), and the memory-mapped reading's first pass
(datasets' conversion to Arrow) for comparison. Medians of --repeats runs.

    python benchmarks/streaming_corpus.py             # ~2 minutes on 2 cores
    python benchmarks/streaming_corpus.py --rows 1000000

Writes benchmarks/results/streaming_corpus.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from softcache.corpus import python_docs, read_rows

HERE = Path(__file__).parent


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="streaming-corpus-"))
    try:
        path = work / "corpus.jsonl"
        paragraphs = [p for topic in python_docs() for p in topic.split("\n\n")]
        with open(path, "w") as handle:
            for i in range(args.rows):
                handle.write(json.dumps({"text": paragraphs[i % len(paragraphs)]}) + "\n")
        datasets.config.HF_DATASETS_CACHE = work / "datasets-cache"  # a cold cache for the mapped reading

        def bare():
            for _ in datasets.load_dataset("json", data_files=str(path), split="train", streaming=True):
                pass

        places = []

        def streamed():
            places[:] = [place for place, _, _, _ in read_rows(str(path), streaming=True).positioned()]

        def mapped():
            for _ in read_rows(str(path)).positioned():
                pass

        late = int(args.rows * 0.9)
        mapped_first = timed(lambda: read_rows(str(path)))  # converts to Arrow once, then memory-maps
        runs = {"bare": [], "streamed": [], "mapped": [], "first": [], "resumed": []}
        for _ in range(args.repeats):
            runs["bare"].append(timed(bare))
            runs["streamed"].append(timed(streamed))
            runs["mapped"].append(timed(mapped))
            runs["first"].append(timed(lambda: next(read_rows(str(path), streaming=True).positioned())))
            runs["resumed"].append(timed(lambda: next(read_rows(str(path), streaming=True).positioned(places[late]))))
        assert len(places) == args.rows
        resumed = next(read_rows(str(path), streaming=True).positioned(places[late]))
        assert resumed[2] == late and resumed[3] == paragraphs[late % len(paragraphs)], "resumed at the right row"
        median = {name: statistics.median(values) for name, values in runs.items()}
        results = {
            "machine": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
                       f"datasets {datasets.__version__}",
            "rows": args.rows, "file_bytes": path.stat().st_size, "late_row": late, "repeats": args.repeats,
            "seconds": runs, "median_seconds": median, "state_us_per_row": (median["streamed"] - median["bare"])
            / args.rows * 1e6, "mapped_first_read_seconds": mapped_first,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(results)


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "streaming_corpus.json").write_text(json.dumps(results, indent=2) + "\n")
    med = results["median_seconds"]
    lines = [
        "# --streaming: reading, and resuming from a cursor",
        "",
        f"A JSON-lines file of {results['rows']:,} rows ({results['file_bytes'] / 1e6:.1f} MB) on "
        f"{results['machine']}; medians of {results['repeats']} runs. Produced by "
        "`python benchmarks/streaming_corpus.py`.",
        "",
        "| what | seconds |",
        "| --- | ---: |",
        f"| every row, bare IterableDataset | {med['bare']:.2f} |",
        f"| every row, softcache --streaming (each with the stream's state) | {med['streamed']:.2f} |",
        f"| every row, softcache memory-mapped (after its first load) | {med['mapped']:.2f} |",
        f"| to the first row, from the start | {med['first']:.2f} |",
        f"| to the first row, resumed at row {results['late_row']:,} from its place | {med['resumed']:.2f} |",
        f"| the memory-mapped reading's first load (conversion to Arrow), once | "
        f"{results['mapped_first_read_seconds']:.2f} |",
        "",
        f"softcache's streamed reading costs {results['state_us_per_row']:.1f} µs a row over the bare stream: the "
        "stream's state taken and written as JSON for each row (~9 µs of it), and the row's place and values. "
        "Resuming parses the file's earlier part into Arrow again but makes no Python rows of it.",
        "",
    ]
    (out / "streaming_corpus.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
