"""Capacity plan: what a store of 1B, 100B and 1T tokens costs, and what breaks first.

Every number comes from one of three places, and the report says which:
  committed   a benchmark result in benchmarks/results/*.json (bytes per token, reader throughput)
  published   a vendor's or paper's figure, with its source (GPU peak, model shapes, filesystem and
              object-store limits, node memory)
  measured    here, now, through softcache's own code: sha256 throughput; one shard of the default
              size (--shard-size, --seq-len from CacheConfig) written by each format and verified;
              and, for N synthetic shards (--points), the rank-0 finish (progress records read,
              complete manifest written), the manifest's size, a reader's open time and the memory
              its shard table holds. Larger stores are extrapolated linearly from those points only.

Then, for each item that grows with the corpus, the scale at which it crosses its limit (a published
limit, or a stated budget: --budget-hours for a step that stalls a job or a reader, --memory-share of
a node's memory).

    python benchmarks/capacity_plan.py          # about 2 minutes of CPU; more on a busy disk

Writes benchmarks/results/capacity_plan.md (and .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from softcache.config import CacheConfig
from softcache.store import Layout, StoreWriter, open_store
from softcache.store.encoding import Encoding, encode
from softcache.store.files import remove_temporaries, sha256_file
from softcache.store.manifest import RECORD_SEAL, FileEntry, ShardRecord, progress_name, read_progress, sealed
from softcache.store.registry import storage_section

HERE = Path(__file__).parent
CORPORA = {"1B": 1e9, "100B": 1e11, "1T": 1e12}


@dataclasses.dataclass(frozen=True)
class Teacher:
    parameters: float
    layers: int
    width: int
    vocab: int
    source: str


# ---- published figures ---------------------------------------------------------------------------
PEAK_FLOPS = 989e12
"""H100 SXM dense BF16 Tensor Core FLOP/s [H100]."""
TEACHERS = {  # nominal sizes; shapes (for the attention term) and vocabularies from each model's config.json
    "1B": Teacher(1e9, 16, 2048, 128_256, "meta-llama/Llama-3.2-1B"),
    "8B": Teacher(8e9, 32, 4096, 128_256, "meta-llama/Llama-3.1-8B"),
    "70B": Teacher(70e9, 80, 8192, 128_256, "meta-llama/Llama-3.1-70B"),
}
EXT4_DIRECTORY = 10e6
"""Entries one ext4 directory holds without the large_dir feature [ext4]."""
S3_SMALL_REQUEST_S = 0.010
"""Latency of one small GET: the low end of "tens of milliseconds" [S3], an optimistic floor."""
NODE_MEMORY = 2e12
NODE_GPUS = 8
SOURCES = {
    "H100": "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS 'with sparsity', "
            "half that (989 TFLOPS) dense.",
    "Kaplan": "Kaplan et al. 2020, 'Scaling Laws for Neural Language Models', table 1: forward FLOPs per token "
              "= 2 N + 2 n_layer n_ctx d_attn (the attention term counts the whole context: an upper bound for "
              "causal attention).",
    "Llama": "config.json of " + ", ".join(f"{t.source} ({t.layers} layers, hidden size {t.width}, vocabulary "
                                          f"{t.vocab:,})" for t in TEACHERS.values()) + " on the Hugging Face hub.",
    "ext4": "Linux commit e08ac99 'ext4: add largedir feature' (2017): without it an htree has at most 2 levels, "
            "'the current limit of approximately 10M entries in a single directory'.",
    "S3": "AWS S3 user guide, 'Optimizing performance': at least 3,500 PUT and 5,500 GET requests/s per partitioned "
          "prefix; AWS whitepaper 'Best practices design patterns: optimizing Amazon S3 performance': small "
          "requests have median latencies 'in the tens of milliseconds'.",
    "node": "NVIDIA DGX H100 datasheet: 8 H100 SXM GPUs, 2 TB system memory.",
}


# ---- committed measurements ----------------------------------------------------------------------

def committed(results: Path) -> dict:
    """Bytes per token of each target kind and format, and reader throughput, from the committed
    benchmark results; each figure with the file and row it comes from."""
    encodings = json.loads((results / "encodings.json").read_text())

    def row(targets: str, ids: str, values: str) -> dict:
        return next(r for r in encodings["rows"] if (r["targets"], r["ids"], r["values"]) == (targets, ids, values))

    kinds = {}
    for name, targets, values in (("top-64", "top-64", "log8"), ("sampled N=50", "sampled N=50", "counts")):
        found = row(targets, "delta", values)
        kinds[name] = {"zarr": found["zarr_bytes_per_token"], "arrow": found["arrow_bytes_per_token"],
                       "entries_per_position": found.get("entries_per_position", 64),
                       "source": f"encodings.json rows[targets={targets!r}, ids='delta', values={values!r}]"}
    cache_job = json.loads((results / "cache_job.json").read_text())
    quality = json.loads((results / "quality.json").read_text())
    chat = json.loads((results / "chat.json").read_text())
    train_step = json.loads((results / "train_step.json").read_text())
    memory = json.loads((results / "corpus_memory.json").read_text())
    zarr_readers = [r for r in train_step["readers"] if r["format"] == "zarr" and r["workers"] > 0]
    per_worker = min(r["tokens_per_s"] / r["workers"] for r in zarr_readers)
    default_codec = next(r for r in cache_job["storage"] if r["codec"].get("name") == "blosc"
                         and r["codec"].get("cname") == "zstd")
    return {
        "teacher": encodings["teacher"], "vocab": encodings["vocab"], "seq_len": encodings["seq_len"],
        "kinds": kinds,
        "cross_checks": {  # the same top-64 figure measured by other benchmarks
            "cache_job.json storage[blosc zstd-3] (top-64, seq_len 512)": default_codec["bytes_per_token"],
            "quality.json seeded[0]['fkl-bucket k=64'] (seq_len 256)": quality["seeded"]["0"]["fkl-bucket k=64"][
                "bytes_per_token"],
            "chat.json sizes.text.top64 (seq_len 512)": chat["sizes"]["text"]["top64"]["bytes_per_token"],
            "chat.json sizes.chat.top64 (masked chat rows, per position)": chat["sizes"]["chat"]["top64"][
                "bytes_per_token"],
        },
        "cache_job_ratio": cache_job["median_ratio_to_bare"]["zarr"],
        "reader_per_worker": per_worker,
        "index_tokens_per_s": memory["throughput"]["index"]["tokens_per_s"],
        "index_source": (f"corpus_memory.json throughput.index: the job's index pass over "
                         f"{memory['throughput_corpus_tokens'] / 1e6:.0f}M tokens of JSON lines, the test teacher's "
                         "byte-level BPE tokenizer, one process"),
        "reader_source": (f"train_step.json readers (zarr, top-64, seq_len {train_step['seq_len']}): the lowest "
                          f"tokens/s per DataLoader worker, {train_step['machine']}"),
    }


def arrow_bytes_per_token(encoding: Encoding, entries: float, seq_len: int) -> float:
    """An uncompressed (arrow) shard's bytes per token from the encoding's dtypes: the fixed columns,
    ``entries`` (id, value) pairs per position, and two int64 offsets per sequence for each ragged column."""
    fixed = sum(encoding.dtype(name).itemsize for name in encoding.fixed_columns)
    entry = encoding.dtype("target_ids").itemsize + encoding.dtype("target_values").itemsize
    return fixed + entries * entry + 2 * 8 / seq_len


# ---- measured here -------------------------------------------------------------------------------

def timed(work):
    """(``work()``, wall seconds, CPU seconds of this process). CPU time is what the extrapolations use: the
    machine these run on is shared, and waiting for another process's turn is no cost of softcache's."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def sha256_rates(megabytes: int, scratch: Path) -> dict:
    """Bytes/s of hashlib.sha256 over one in-memory buffer, and of softcache's sha256_file over a file of
    the same bytes (just written, so mostly from the page cache)."""
    data = np.random.default_rng(0).bytes(megabytes << 20)
    _, _, memory = timed(lambda: hashlib.sha256(data).hexdigest())
    path = scratch / "blob"
    path.write_bytes(data)
    _, _, file = timed(lambda: sha256_file(path))
    path.unlink()
    return {"memory_bytes_per_s": len(data) / memory, "file_bytes_per_s": len(data) / file}


def index_bytes_per_shard(shards: int = 1000) -> float:
    """Bytes a shard adds to a saved corpus index (softcache.corpus_stream.CorpusIndex as JSON), at its
    largest: whole documents with all 32 open rows in every cursor, row numbers and fills of 7 digits."""
    from softcache.corpus_stream import CorpusIndex, Cursor, Summary, index_json
    from softcache.documents import OPEN_ROWS

    def sized(count: int) -> int:
        cursors = [Cursor((3, 1_234_567), 2, tuple((9_000_000 + r, 1_000 + r) for r in range(OPEN_ROWS)))] * count
        index = CorpusIndex(Summary(), 256, cursors, ["0" * 64] * count)
        return len(index_json(index.to_dict()))

    return (sized(shards) - sized(0)) / shards


def defaults() -> CacheConfig:
    return CacheConfig(teacher="-", data="-", out="-")


def synthetic_columns(encoding: Encoding, count: int, seq_len: int, entries: float, seed: int = 0) -> dict:
    """Encoded columns of ``count`` sequences with made-up targets of the right shape: sorted random ids,
    random log-probabilities (top-k) or counts (sampled, ``entries`` distinct ids per position on average)."""
    rng = np.random.default_rng(seed)
    k, vocab = encoding.k, encoding.vocab_size
    ids = np.cumsum(rng.integers(1, 2 * vocab // k, (count, seq_len, k)), axis=-1) % vocab
    input_ids = rng.integers(0, vocab, (count, seq_len))
    if encoding.values == "counts":
        lengths = np.clip(rng.poisson(entries, (count, seq_len)), 1, k)
        counts = rng.integers(1, 4, (count, seq_len, k))
        return encode(encoding, input_ids, ids, counts, lengths=lengths)
    mass = rng.gamma(0.3, size=(count, seq_len, k + 1)).astype(np.float32)
    return encode(encoding, input_ids, ids, np.log(mass / mass.sum(-1, keepdims=True))[..., :k])


def header(layout: Layout, encoding: Encoding, format_name: str) -> dict:
    return {"storage": storage_section(format_name, layout, encoding), "layout": layout.to_dict(),
            "encoding": encoding.to_dict(), "targets": {"kind": encoding.kind, "k": encoding.k, "temperature": 1.0},
            "teacher": {"name": "synthetic"}, "tokenizer": {"fingerprint": "0" * 64, "vocab_size": encoding.vocab_size},
            "corpus": {"source": "synthetic", "fingerprint": "1" * 64}}


def one_shard(format_name: str, encoding: Encoding, columns: dict, layout: Layout, root: Path) -> dict:
    """Write one default-size shard with ``format_name`` and verify it (files against their sha256,
    columns decoded and digested: what ``softcache verify`` does per shard, and what a job does for
    a progress record it did not write itself); its files, bytes and the median verify time."""
    with StoreWriter.open(root, header(layout, encoding, format_name)) as writer:
        record = writer.write_shard(0, columns)
        writer.finish()
    runs = [timed(open_store(root).verify) for _ in range(3)]
    assert not any(problems for problems, _, _ in runs), runs[0][0]
    shutil.rmtree(root)
    return {"files": [f.path for f in record.files], "bytes": record.bytes,
            "bytes_per_token": record.bytes / layout.num_tokens,
            "verify_s": float(np.median([cpu for _, _, cpu in runs])),
            "verify_wall_s": float(np.median([wall for _, wall, _ in runs]))}


def manifest_at(shards: int, shard: dict, encoding: Encoding, format_name: str, root: Path) -> dict:
    """The rank-0 finish of a store of ``shards`` shards like ``shard`` (its file list, renamed for each
    index; made-up sizes and digests): sealed progress records written, then timed through softcache's
    code: read back (read_progress), the complete manifest written (StoreWriter.finish), the store
    opened by a reader (open_store: parse and check the shard table), and the memory that reader
    holds (tracemalloc)."""
    defaults_ = defaults()
    layout = Layout(shards * defaults_.shard_size, defaults_.seq_len, defaults_.shard_size)
    prefix = shard["files"][0].split("00000")[0]
    writer = StoreWriter.open(root, header(layout, encoding, format_name))
    (root / "progress").mkdir(exist_ok=True)
    for index in range(shards):
        files = tuple(FileEntry(path=path.replace(f"{prefix}00000", f"{prefix}{index:05d}", 1), bytes=1_000_000 + index,
                                sha256=hashlib.sha256(f"{index} {path}".encode()).hexdigest())
                      for path in shard["files"])
        record = ShardRecord(index=index, first=index * layout.shard_size, count=layout.shard_size,
                             bytes=sum(f.bytes for f in files), files=files,
                             content_sha256=hashlib.sha256(str(index).encode()).hexdigest(),
                             teacher_nll={"sum": 1.5 * index, "count": layout.shard_size * layout.seq_len})
        with open(root / progress_name(index), "w") as handle:  # as write_json writes it, without the fsyncs
            json.dump(sealed(record.to_dict(), RECORD_SEAL), handle, indent=2)
            handle.write("\n")
    os.sync()  # a job's records are durable before its finish: flushing ours is no part of the finish's time
    writer.done, read_wall, read_s = timed(lambda: read_progress(root))
    assert len(writer.done) == shards
    manifest, finish_wall, finish_s = timed(writer.finish)
    _, open_wall, open_s = timed(lambda: open_store(root))
    broadcast_bytes = len(pickle.dumps(manifest))  # what TeacherJob.finish sends every other rank
    tracemalloc.start()
    store = open_store(root)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del store
    result = {"shards": shards, "read_progress_s": read_s, "finish_s": finish_s, "open_s": open_s,
              "wall_s": {"read_progress": read_wall, "finish": finish_wall, "open": open_wall},
              "manifest_bytes": (root / "manifest.json").stat().st_size, "reader_memory_bytes": held,
              "broadcast_bytes": broadcast_bytes}
    shutil.rmtree(root)
    return result


def walk_at(shards: int, shard: dict, root: Path) -> dict:
    """The walk a writer makes over the whole store at each start, looking for a crashed run's leftovers
    (remove_temporaries), timed over ``shards`` shards of empty files named like ``shard``'s."""
    prefix = shard["files"][0].split("00000")[0]
    for index in range(shards):
        for path in shard["files"]:
            target = root / path.replace(f"{prefix}00000", f"{prefix}{index:05d}", 1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    _, wall, cpu = timed(lambda: remove_temporaries(root))
    tracemalloc.start()
    remove_temporaries(root)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    shutil.rmtree(root)
    return {"shards": shards, "walk_s": cpu, "wall_s": wall, "peak_bytes": peak}


def linear(points: list[dict], key: str) -> tuple[float, float]:
    """(intercept, per-shard slope) of ``key`` against the shard count, least squares over the points."""
    x = np.array([p["shards"] for p in points], dtype=float)
    y = np.array([p[key] for p in points], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


# ---- the plan ------------------------------------------------------------------------------------

def crossing(figure, limit: float, low: float = 1e6, high: float = 1e16) -> float | None:
    """The corpus size (tokens) at which the increasing ``figure(tokens)`` reaches ``limit``; None past ``high``."""
    if figure(high) < limit:
        return None
    if figure(low) >= limit:
        return low
    for _ in range(200):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if figure(middle) < limit else (low, middle)
    return high


def plan(args, measured: dict, results: dict) -> dict:
    config = defaults()
    tokens_per_shard = config.seq_len * config.shard_size

    def shards(tokens: float) -> int:
        return math.ceil(tokens / tokens_per_shard)

    kinds = results["kinds"]
    zarr_files = {kind: len(measured["shards"][f"zarr {kind}"]["files"]) for kind in kinds}
    fits = {fmt: {key: linear(measured["manifests"][fmt], key)
                  for key in ("read_progress_s", "finish_s", "manifest_bytes", "open_s", "reader_memory_bytes",
                              "broadcast_bytes")}
            for fmt in measured["manifests"]}
    walk = {key: linear(measured["walks"], key) for key in ("walk_s", "peak_bytes")}

    def at(fmt: str, key: str, tokens: float) -> float:
        """A manifest figure (``fits``) at a corpus of ``tokens``."""
        intercept, slope = fits[fmt][key]
        return intercept + slope * shards(tokens)

    def walk_at_(key: str, tokens: float) -> float:
        return walk[key][0] + walk[key][1] * shards(tokens)

    verify_per_shard = measured["shards"]["zarr top-64"]["verify_s"]
    ranks = args.ranks
    on_node = min(ranks, NODE_GPUS)  # ranks on one node: one a GPU
    processes = on_node * (1 + args.workers)
    budget = args.budget_hours * 3600

    def teacher_hours(teacher: Teacher, tokens: float) -> float:
        flops = 2 * teacher.parameters + 2 * teacher.layers * config.seq_len * teacher.width
        return tokens * flops / (args.mfu * PEAK_FLOPS) / 3600

    scales = {}
    for name, tokens in CORPORA.items():
        n = shards(tokens)
        scales[name] = {
            "tokens": tokens, "shards": n,
            "store_bytes": {**{f"{fmt} {kind}": tokens * kinds[kind][fmt]
                               for kind in kinds for fmt in ("zarr", "arrow")},
                            **{f"arrow {kind}, vocabulary {TEACHERS['8B'].vocab:,}":
                               tokens * measured["arrow_check"][kind]["computed_at_teacher_vocab"] for kind in kinds}},
            "files": {**{f"zarr {kind}": n * zarr_files[kind] for kind in kinds}, "arrow": n},
            "largest_directory": n,
            "teacher_gpu_hours": {t: teacher_hours(teacher, tokens) for t, teacher in TEACHERS.items()},
            "manifest_bytes": {fmt: at(fmt, "manifest_bytes", tokens) for fmt in fits},
            "reader_open_s": {fmt: at(fmt, "open_s", tokens) for fmt in fits},
            "reader_memory_bytes": {fmt: at(fmt, "reader_memory_bytes", tokens) for fmt in fits},
            "writer_start_walk_s": walk_at_("walk_s", tokens),
            "writer_start_walk_peak_bytes": walk_at_("peak_bytes", tokens),
            "finish_one_rank_s": at("zarr top-64", "read_progress_s", tokens) + at("zarr top-64", "finish_s", tokens),
            "finish_revalidation_s": (ranks - 1) / ranks * n * verify_per_shard,
            "verify_s": n * verify_per_shard,
            "checksum_only_s": tokens * kinds["top-64"]["zarr"] / measured["sha256"]["file_bytes_per_s"],
        }

    student_tokens_per_s = args.mfu * PEAK_FLOPS / (6 * args.student_parameters)
    hours = "budget (--budget-hours)"
    stalled = "budget (--budget-hours); every GPU of the job waits"
    breaks = [  # (what, its figure at a corpus size in tokens, limit, unit, what the limit is)
        ("entries of one directory (data.zarr/shards/, shards/, progress/: one a shard)",
         lambda t: shards(t), EXT4_DIRECTORY, "entries", "ext4 without large_dir [ext4]"),
        (f"shard tables on a node: {on_node} ranks x (1 + {args.workers} workers), each opens the store (zarr top-64)",
         lambda t: processes * at("zarr top-64", "reader_memory_bytes", t), args.memory_share * NODE_MEMORY, "bytes",
         f"{args.memory_share:.0%} of a node's memory (--memory-share) [node]"),
        ("a reader opening the store: parse and check the manifest (every rank and worker, every start)",
         lambda t: at("zarr top-64", "open_s", t), budget, "s", hours),
        ("rank-0 finish, one rank: read every progress record, write the manifest",
         lambda t: at("zarr top-64", "read_progress_s", t) + at("zarr top-64", "finish_s", t), budget, "s", stalled),
        (f"rank-0 finish, {ranks} ranks: rank 0 re-reads and re-checks every other rank's shard, one at a time",
         lambda t: (ranks - 1) / ranks * shards(t) * verify_per_shard, budget, "s", stalled),
        ("a resumed job: every rank re-checks every shard already written, one at a time (figure: stopped just "
         "before its finish)", lambda t: shards(t) * verify_per_shard, budget, "s", stalled),
        ("a writer's start (every resume too): one walk over the whole store for a crashed run's leftovers (zarr)",
         lambda t: walk_at_("walk_s", t), budget, "s", stalled),
        ("softcache verify (one process)", lambda t: shards(t) * verify_per_shard, budget, "s", hours),
        (f"rank-0 finish of a store at a URL, {ranks} ranks: one GET per progress record and per file of the other "
         "ranks' shards, one at a time", lambda t: shards(t) * (1 + (ranks - 1) / ranks * zarr_files["top-64"])
         * S3_SMALL_REQUEST_S, budget, "s", f"{stalled}; {S3_SMALL_REQUEST_S * 1000:.0f} ms a request [S3]"),
        ("the corpus index pass: rank 0 reads, tokenizes and packs the whole corpus once, before the teacher starts "
         "(memory stays flat: softcache.corpus_stream)", lambda t: t / results["index_tokens_per_s"], budget, "s",
         stalled),
        (f"the corpus index (a cursor and a digest a shard; whole documents: 32 open rows each), held by each of "
         f"{on_node} ranks on a node", lambda t: on_node * shards(t) * measured["index_bytes_per_shard"],
         args.memory_share * NODE_MEMORY, "bytes", f"{args.memory_share:.0%} of a node's memory (--memory-share) [node]"),
    ]
    verdicts = []
    for item, figure, limit, unit, source in breaks:
        at_scales = {name: figure(tokens) for name, tokens in CORPORA.items()}
        verdicts.append({"item": item, "unit": unit, "limit": limit, "limit_source": source, "at": at_scales,
                         "breaks_at_tokens": crossing(figure, limit)})
    return {
        "defaults": {"seq_len": config.seq_len, "shard_size": config.shard_size, "tokens_per_shard": tokens_per_shard,
                     "format": config.format, "targets": config.targets, "k": config.k, "samples": config.samples},
        "zarr_files_per_shard": zarr_files, "fits": fits, "walk_fit": walk, "scales": scales, "breaks": verdicts,
        "student": {"parameters": args.student_parameters, "tokens_per_s": student_tokens_per_s,
                    "reader_per_worker": results["reader_per_worker"],
                    "workers_needed": math.ceil(student_tokens_per_s / results["reader_per_worker"]),
                    "read_bytes_per_s": student_tokens_per_s * kinds["top-64"]["zarr"]},
    }


def measure(args) -> dict:
    config = defaults()
    results = committed(Path(args.results))
    vocab = results["vocab"]
    layout = Layout(config.shard_size, config.seq_len, config.shard_size)
    # The two kinds the committed results measured, whatever the defaults are.
    encodings = {"top-64": dataclasses.replace(config, targets="topk", k=64).encoding(vocab),
                 "sampled N=50": dataclasses.replace(config, targets="sampled", samples=50).encoding(vocab)}
    with tempfile.TemporaryDirectory(prefix="capacity-plan-") as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        measured = {"sha256": sha256_rates(args.hash_megabytes, scratch), "shards": {}, "manifests": {},
                    "index_bytes_per_shard": index_bytes_per_shard()}
        for kind, encoding in encodings.items():
            columns = synthetic_columns(encoding, config.shard_size, config.seq_len,
                                        results["kinds"][kind]["entries_per_position"])
            for format_name in ("zarr", "arrow"):
                measured["shards"][f"{format_name} {kind}"] = one_shard(format_name, encoding, columns, layout,
                                                                         scratch / "shard")
                print(f"{format_name} {kind}: {measured['shards'][f'{format_name} {kind}']}", flush=True)
        for name in ("zarr top-64", "arrow top-64"):
            points = []
            for shards in args.points:
                points.append(manifest_at(shards, measured["shards"][name], encodings["top-64"], name.split()[0],
                                          scratch / "manifest"))
                print(f"{name}: {points[-1]}", flush=True)
            measured["manifests"][name] = points
        measured["walks"] = [walk_at(shards, measured["shards"]["zarr top-64"], scratch / "walk")
                             for shards in args.walk_points]
        print(f"walks: {measured['walks']}", flush=True)
        measured["seconds"] = time.perf_counter() - started
    measured["arrow_check"] = {kind: {"computed_at_measured_vocab": arrow_bytes_per_token(
        encodings[kind], results["kinds"][kind]["entries_per_position"], results["seq_len"]),
        "measured": results["kinds"][kind]["arrow"],
        "computed_at_teacher_vocab": arrow_bytes_per_token(
            dataclasses.replace(encodings[kind], vocab_size=TEACHERS["8B"].vocab),
            results["kinds"][kind]["entries_per_position"], config.seq_len)} for kind in encodings}
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "load_average": os.getloadavg(), "committed": results, "measured": measured}


# ---- report --------------------------------------------------------------------------------------

def size(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.0f} B"


def duration(seconds: float) -> str:
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:,.1f} {unit}"
    return f"{seconds:,.1f} s"


def count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:,.1f}{unit}"
    return f"{value:,.0f}"


def show(value: float, unit: str) -> str:
    return {"bytes": size, "s": duration, "entries": count}[unit](value)


def report(data: dict, args) -> list[str]:
    c, m, p = data["committed"], data["measured"], data["plan"]
    d, kinds, fits = p["defaults"], c["kinds"], p["fits"]
    kind_flag = f"--samples {d['samples']}" if d["targets"] == "sampled" else f"--k {d['k']}"
    lines = [
        "# Capacity plan: 1B, 100B and 1T tokens",
        "",
        f"Produced by `python benchmarks/capacity_plan.py` in {m['seconds']:.0f} s ({data['machine']}, shared: load "
        f"average {data['load_average'][0]:.1f}). Defaults read from `CacheConfig`: --seq-len {d['seq_len']}, "
        f"--shard-size {d['shard_size']} ({d['tokens_per_shard']:,} tokens a shard), --format {d['format']}, "
        f"--targets {d['targets']} {kind_flag}. *measured*: by this script, through softcache's own code; "
        "*committed*: from the benchmark results beside this file; *published*: from the sources at the end. "
        "Larger stores are extrapolated linearly from the measured points.",
        "",
        "## Cost",
        "",
        "| corpus | shards | zarr top-64 | zarr sampled N=50 | arrow top-64 | top-64 at vocabulary 128,256 "
        "(arrow) | files: zarr top-64 / arrow | teacher H100-hours: 1B / 8B / 70B |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in p["scales"].items():
        bytes_ = s["store_bytes"]
        lines.append(f"| {name} tokens | {s['shards']:,} | {size(bytes_['zarr top-64'])} | "
                     f"{size(bytes_['zarr sampled N=50'])} | {size(bytes_['arrow top-64'])} | "
                     f"{size(bytes_['arrow top-64, vocabulary 128,256'])} | {count(s['files']['zarr top-64'])} / "
                     f"{count(s['files']['arrow'])} | "
                     + " / ".join(f"{h:,.0f}" for h in s["teacher_gpu_hours"].values()) + " |")
    lines += [
        "",
        "| corpus | manifest: zarr / arrow | reader open: zarr / arrow | shard table a reader holds: zarr / arrow "
        f"| rank-0 finish, 1 rank | rank-0 finish, {args.ranks} ranks | softcache verify | sha256 of every file |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in p["scales"].items():
        lines.append(f"| {name} tokens | {pair(s['manifest_bytes'], size)} | {pair(s['reader_open_s'], duration)} | "
                     f"{pair(s['reader_memory_bytes'], size)} | {duration(s['finish_one_rank_s'])} | "
                     f"{duration(s['finish_one_rank_s'] + s['finish_revalidation_s'])} | {duration(s['verify_s'])} | "
                     f"{duration(s['checksum_only_s'])} |")
    lines += ["", "## What breaks first", "",
              "| item | 1B | 100B | 1T | limit | breaks at |", "| --- | ---: | ---: | ---: | --- | ---: |"]
    for b in sorted(p["breaks"], key=lambda b: b["breaks_at_tokens"] or math.inf):
        lines.append(f"| {b['item']} | " + " | ".join(show(v, b["unit"]) for v in b["at"].values())
                     + f" | {show(b['limit'], b['unit'])}: {b['limit_source']} | **{where(b)}** |")
    student = p["student"]
    manifests = m["manifests"]
    lines += [
        "",
        f"Reader vs student: a {student['parameters'] / 1e9:g}B-parameter student on one H100 at {args.mfu:.0%} MFU "
        f"consumes {student['tokens_per_s']:,.0f} tokens/s (MFU x peak / (6 x parameters)), "
        f"{size(student['read_bytes_per_s'])}/s of zarr top-64; one DataLoader worker reads "
        f"{student['reader_per_worker']:,.0f} tokens/s (*committed*: {c['reader_source']}): "
        f"{student['workers_needed']} worker a GPU keeps up, at any corpus size.",
        "",
        "## Assumptions",
        "",
        f"- Bytes per token (*committed*; teacher {c['teacher']}, vocabulary {c['vocab']:,}, seq_len {c['seq_len']}): "
        + "; ".join(f"{kind}: zarr {k['zarr']:.1f}, arrow {k['arrow']:.1f} ({k['source']})"
                    for kind, k in kinds.items())
        + ". The same top-64 figure in other results: "
        + "; ".join(f"{name}: {value:.1f}" for name, value in c["cross_checks"].items()) + ".",
        "- The teacher changes bytes per token through its vocabulary and its entropy. Ids up to 65,536 are uint16, "
        "larger ones int32. Uncompressed (arrow) sizes follow from the encoding's dtypes: "
        + "; ".join(f"{kind} {a['computed_at_measured_vocab']:.1f} B/token at vocabulary {c['vocab']:,} (measured "
                    f"{a['measured']:.1f}), {a['computed_at_teacher_vocab']:.1f} at 128,256 (the Llama 3 teachers')"
                    for kind, a in m["arrow_check"].items())
        + ". Zarr at a vocabulary above 65,536 is not measured; compressed, it is at most about the arrow figure. "
        f"Sampled stores keep {kinds['sampled N=50']['entries_per_position']:.1f} distinct ids a position for "
        "SmolLM2; a teacher of lower entropy keeps fewer.",
        f"- Teacher GPU-hours: forward FLOPs a token = 2 x parameters + 2 x layers x seq_len ({d['seq_len']}) x "
        f"width [Kaplan], shapes [Llama], at {args.mfu:.0%} MFU (--mfu) of {PEAK_FLOPS / 1e12:,.0f} TFLOPS [H100]. "
        f"The forward only: the cache job took {c['cache_job_ratio']:.3f}x the bare forward on CPU (*committed*, "
        "cache_job.json); on a GPU that ratio is not measured.",
        f"- Files a shard (*measured*: one shard of {d['shard_size']} x {d['seq_len']} written by each format): "
        + ", ".join(f"zarr {kind} {n}" for kind, n in p["zarr_files_per_shard"].items())
        + " (the group's zarr.json, and per array its zarr.json and chunks of at most 16 MiB); arrow 1. While a "
        "job runs, every shard also has a record in progress/.",
        f"- sha256 (*measured*, one process): {m['sha256']['memory_bytes_per_s'] / 1e6:,.0f} MB/s in memory, "
        f"{m['sha256']['file_bytes_per_s'] / 1e6:,.0f} MB/s through sha256_file from the page cache. 'sha256 of "
        "every file' is the zarr top-64 store at that rate, no disk limit assumed.",
        "- Checking a shard (*measured*, median of 3 of `Store.verify` on a one-shard store of synthetic targets: "
        "files against their sha256, columns decoded and digested): "
        + "; ".join(f"{name} {s['verify_s']:.2f} s ({s['bytes_per_token']:.0f} B/token)"
                    for name, s in m["shards"].items())
        + ". softcache verify, a resumed job (every record it finds, on every rank) and rank 0's finish of a "
        "multi-rank job (every record another rank wrote) do this for each shard, one at a time "
        "(StoreWriter._record_is_valid).",
        "- Manifest, finish and reader open (*measured* at " + ", ".join(f"{n:,}" for n in args.points)
        + " synthetic shards with the real file lists; records written without fsync, then synced): per shard, "
        + "; ".join(f"{fmt}: manifest {fits[fmt]['manifest_bytes'][1]:,.0f} B, finish "
                    f"{(fits[fmt]['read_progress_s'][1] + fits[fmt]['finish_s'][1]) * 1e3:.2f} ms, reader open "
                    f"{fits[fmt]['open_s'][1] * 1e3:.2f} ms, shard table {fits[fmt]['reader_memory_bytes'][1]:,.0f} B"
                    for fmt in fits)
        + ". Times are CPU seconds of this process (the machine is shared). The finish's wall time here was up to "
        f"{max(q['wall_s']['finish'] / q['finish_s'] for q in sum(manifests.values(), [])):.0f}x its CPU time "
        "(the manifest's fsync, progress/ removed, on a shared disk), and a network filesystem adds its latency to "
        "each progress record read. The finish also pickles the complete manifest for every other rank (last "
        "column below).",
        "- A writer's walk over the store (*measured* at " + ", ".join(f"{q['shards']:,}" for q in m["walks"])
        + " shards of empty files named as a zarr top-64 shard's, through remove_temporaries): per shard "
        f"{p['walk_fit']['walk_s'][1] * 1e3:.2f} ms, peak memory {p['walk_fit']['peak_bytes'][1]:,.0f} B.",
        f"- A job of {args.ranks} ranks (--ranks), at most {NODE_GPUS} a node [node], {args.workers} DataLoader "
        "workers each (--workers); every rank and worker opens the store itself (softcache.data).",
        "",
        "## Measured points (CPU s, wall s in brackets)",
        "",
        "| store | shards | read progress/ | finish (manifest written) | manifest | reader open | shard table held "
        "| manifest pickled |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for fmt, points in manifests.items():
        for q in points:
            w = q["wall_s"]
            lines.append(f"| {fmt} | {q['shards']:,} | {q['read_progress_s']:.2f} ({w['read_progress']:.2f}) | "
                         f"{q['finish_s']:.2f} ({w['finish']:.2f}) | {size(q['manifest_bytes'])} | "
                         f"{q['open_s']:.2f} ({w['open']:.2f}) | {size(q['reader_memory_bytes'])} | "
                         f"{size(q['broadcast_bytes'])} |")
    lines += ["", "## Sources", ""] + [f"- [{label}] {text}" for label, text in SOURCES.items()]
    return lines


def pair(values: dict, show_one) -> str:
    """``values``' zarr and arrow top-64 figures, shown as "zarr / arrow"."""
    return f"{show_one(values['zarr top-64'])} / {show_one(values['arrow top-64'])}"


def where(verdict: dict) -> str:
    return f"{count(verdict['breaks_at_tokens'])} tokens" if verdict["breaks_at_tokens"] else "beyond 10P tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of the GPUs")
    parser.add_argument("--ranks", type=int, default=NODE_GPUS,
                        help=f"ranks of a teacher or training job ({NODE_GPUS} a node)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per training rank")
    parser.add_argument("--student-parameters", type=float, default=1e9)
    parser.add_argument("--budget-hours", type=float, default=1.0,
                        help="longest acceptable time for a step that stalls a job or a reader")
    parser.add_argument("--memory-share", type=float, default=0.1,
                        help="share of a node's memory the shard tables may take")
    parser.add_argument("--points", type=int, nargs="+", default=[500, 2000, 8000],
                        help="shard counts at which the manifest is measured")
    parser.add_argument("--walk-points", type=int, nargs="+", default=[100, 400, 1000],
                        help="shard counts at which the writer's walk over the store is measured")
    parser.add_argument("--hash-megabytes", type=int, default=256)
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()

    data = measure(args)
    data["plan"] = plan(args, data["measured"], data["committed"])
    data["parameters"] = vars(args)
    out = Path(args.results)
    (out / "capacity_plan.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = report(data, args)
    (out / "capacity_plan.md").write_text("\n".join(lines) + "\n")
    print()
    for b in sorted(data["plan"]["breaks"], key=lambda b: b["breaks_at_tokens"] or math.inf):
        print(f"breaks at {where(b)}: {b['item']} (1T tokens: {show(b['at']['1T'], b['unit'])}; limit "
              f"{show(b['limit'], b['unit'])})")


if __name__ == "__main__":
    main()
