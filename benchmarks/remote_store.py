"""Benchmark: a student's step time reading a store at a URL, with an object store's latency, against
the same store on local disk.

The store (synthetic top-k targets, zarr, written once into benchmarks/out/remote_store) is copied
into ``slow://``: fsspec's in-memory filesystem with a fixed wait per request (``--latency``, default
50 ms, an object store's time to first byte; a download is two requests, as with s3fs: a look-up and
the read) and a bandwidth (``--bandwidth``). Each round times ``--steps`` KD steps (DistillationLoss,
forward KL with a tail bucket, alpha 0.5; AdamW) of the same small student reading the same batches
through StoreDataset and a DataLoader, for each mode back to back:
  local -- the store on local disk;
  remote -- the URL, each shard downloaded when it is first read (SOFTCACHE_PREFETCH=0);
  remote-prefetch -- the URL, ``--prefetch`` shards fetched ahead in the background (SOFTCACHE_PREFETCH);
each remote mode with an empty mirror (a fresh SOFTCACHE_CACHE) every round, so that every shard is
downloaded while the student trains. The first step of a round (the DataLoader's start and, for
the remote modes, the first window of shards, which nothing can fetch earlier) is reported apart;
the step time is the mean of the others. Medians over rounds; ratios are medians of the per-round
ratios to local.

    python benchmarks/remote_store.py            # a few minutes on a 2-core CPU

Writes benchmarks/results/remote_store.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from torch.utils.data import DataLoader

from softcache.data import StoreDataset
from softcache.optim import adamw
from softcache.store import Encoding, Layout, StoreWriter
from softcache.store.encoding import encode
from softcache.store.registry import storage_section
from softcache.student import build_student

from train_step import kd_step  # the same KD step as the student-step benchmark

HERE = Path(__file__).parent
STUDENT = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 256,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 512}
MODES = ("local", "remote", "remote-prefetch")


class SlowFileSystem(MemoryFileSystem):
    """fsspec's in-memory filesystem under ``slow://``, every request waiting ``latency`` seconds and
    every read ``size / bandwidth`` more: an object store seen from a training node."""

    protocol = "slow"
    store: dict = {}
    pseudo_dirs = [""]
    latency = 0.05
    bandwidth = 100e6

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path).removeprefix("slow://").strip("/")
        return "/" + path if path else ""

    def info(self, path, **kwargs):
        time.sleep(self.latency)
        return super().info(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        time.sleep(self.latency)
        return super().ls(path, detail=detail, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        time.sleep(self.latency)
        if "r" in mode and path in self.store:
            data = self.store[path].getvalue()
            time.sleep(len(data) / self.bandwidth)
            return MemoryFile(None, path, data)  # a copy: downloads in several threads share no position
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("slow", SlowFileSystem, clobber=True)


def write_store(root: Path, sequences: int, seq_len: int, shard_size: int, k: int, vocab: int) -> None:
    """A complete store of random top-k targets (distinct ids, log-probs that leave a tail)."""
    if (root / "manifest.json").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    layout, encoding = Layout(sequences, seq_len, shard_size), Encoding("topk", k, vocab)
    header = {"storage": storage_section("zarr", layout, encoding), "layout": layout.to_dict(),
              "encoding": encoding.to_dict(), "targets": {"kind": "topk", "k": k, "temperature": 1.0},
              "teacher": {"name": "synthetic"}, "tokenizer": {"fingerprint": "0" * 64, "vocab_size": vocab},
              "corpus": {"source": "synthetic", "fingerprint": "1" * 64}}
    with StoreWriter.open(root, header) as writer:
        writer.save_tokenizer(lambda d: (d.mkdir(), (d / "tokenizer.json").write_text("{}")))
        for index in writer.pending:
            rng = np.random.default_rng(index)
            _, count = layout.shard_bounds(index)
            ids = (rng.integers(0, vocab, (count, seq_len, 1)) + np.arange(k) * (vocab // k)) % vocab
            values = np.log(rng.dirichlet(np.ones(k + 1), size=(count, seq_len))[..., :k]).astype(np.float32)
            writer.write_shard(index, encode(encoding, rng.integers(0, vocab, (count, seq_len)), ids,
                                             -np.sort(-values, axis=-1)))
        writer.finish()


def publish(root: Path, url: str) -> None:
    """Copy the local store to ``url`` (without the wait: the benchmark times reads only)."""
    fs, latency = fsspec.filesystem("slow"), SlowFileSystem.latency
    SlowFileSystem.latency = 0.0
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "writer.lock":
            fs.pipe_file(f"{url}/{path.relative_to(root).as_posix()}", path.read_bytes())
    SlowFileSystem.latency = latency


def timed_round(mode: str, store: str, args, model, optimizer, cache: Path) -> tuple[float, float, float]:
    """(first step, mean of the other steps, longest of them) in seconds, reading ``store``."""
    os.environ["SOFTCACHE_CACHE"] = str(cache)  # read when the (worker's) reader opens the store
    os.environ["SOFTCACHE_PREFETCH"] = str(args.prefetch if mode == "remote-prefetch" else 0)
    dataset = StoreDataset(store, args.batch_size, seed=0, epochs=1)
    stream = iter(DataLoader(dataset, batch_size=None, num_workers=args.workers))
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        kd_step(model, optimizer, next(stream))
        times.append(time.perf_counter() - started)
    del stream
    return times[0], statistics.mean(times[1:]), max(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--bandwidth", type=float, default=100.0, help="MB/s per download")
    parser.add_argument("--prefetch", type=int, default=4, help="SOFTCACHE_PREFETCH of the remote-prefetch mode")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (softcache train's default: 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=17, help="steps per round and mode (the first is timed apart)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the student (1 leaves a core to the reader on a 2-core machine)")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    SlowFileSystem.latency, SlowFileSystem.bandwidth = args.latency, args.bandwidth * 1e6
    out = HERE / "out" / "remote_store"
    out.mkdir(parents=True, exist_ok=True)
    seq_len, shard_size, k = 128, 16, 16
    sequences = args.batch_size * args.steps * 2
    local = out / f"store-{sequences}"
    write_store(local, sequences, seq_len, shard_size, k, STUDENT["vocab_size"])
    publish(local, "slow://bucket/store")
    (out / "student.json").write_text(json.dumps(STUDENT))
    model = build_student(str(out / "student.json"), seed=0)
    optimizer = adamw(model, 1e-4, 0.1)
    stores = {"local": str(local), "remote": "slow://bucket/store", "remote-prefetch": "slow://bucket/store"}
    load_before = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="softcache-bench-"))
    try:
        timed_round("local", stores["local"], argparse.Namespace(**{**vars(args), "steps": 2}), model, optimizer,
                    scratch / "warm-up")
        rounds = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES:
                rounds[mode].append(timed_round(mode, stores[mode], args, model, optimizer, scratch / f"{mode}-{round_}"))
            print(f"round {round_ + 1}: " + ", ".join(f"{m} {r[-1][1]:.3f} s/step (first {r[-1][0]:.2f} s)"
                                                     for m, r in rounds.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = sum(1 for p in local.rglob("*") if p.is_file() and "shards" in p.parts)
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "latency_s": args.latency, "bandwidth_mb_s": args.bandwidth, "prefetch": args.prefetch,
        "workers": args.workers, "batch_size": args.batch_size, "seq_len": seq_len, "k": k,
        "vocab": STUDENT["vocab_size"], "parameters": sum(p.numel() for p in model.parameters()),
        "shard_size": shard_size, "shards": sequences // shard_size, "files_per_shard": files // (sequences // shard_size),
        "shard_bytes": sum(p.stat().st_size for p in local.rglob("*") if p.is_file() and "shards" in p.parts)
        // (sequences // shard_size),
        "steps_per_round": args.steps, "rounds": args.rounds, "per_round": rounds,
        "median_first_step_s": {m: statistics.median(r[0] for r in rs) for m, rs in rounds.items()},
        "median_step_s": {m: statistics.median(r[1] for r in rs) for m, rs in rounds.items()},
        "median_longest_step_s": {m: statistics.median(r[2] for r in rs) for m, rs in rounds.items()},
        "ratios_to_local": {m: [a[1] / b[1] for a, b in zip(rs, rounds["local"])] for m, rs in rounds.items()},
        "load_average": [load_before, os.getloadavg()[0]],
    }
    results["median_ratio_to_local"] = {m: statistics.median(r) for m, r in results["ratios_to_local"].items()}
    write_report(results, Path(args.results))


LABELS = {
    "local": "local disk",
    "remote": "URL, each shard downloaded when first read (`SOFTCACHE_PREFETCH=0`)",
    "remote-prefetch": "URL, shards fetched ahead (`SOFTCACHE_PREFETCH={prefetch}`)",
}


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "remote_store.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results
    lines = [
        "# Student step reading a store at a URL vs on local disk",
        "",
        f"Store at `slow://`: fsspec's in-memory filesystem with {r['latency_s'] * 1000:g} ms per request and "
        f"{r['bandwidth_mb_s']:g} MB/s per download (a download is two requests: a look-up and the read). "
        f"{r['shards']} zarr shards of {r['shard_size']} sequences x {r['seq_len']} tokens, top-{r['k']} targets, "
        f"{r['files_per_shard']} files and {r['shard_bytes'] / 1024:.0f} KiB per shard. Student: Llama, "
        f"{r['parameters'] / 1e6:.2f} M parameters (vocab {r['vocab']:,}), KD step (fkl, tail bucket, alpha 0.5, "
        f"AdamW), batch {r['batch_size']}, DataLoader workers {r['workers']}; on CPU ({r['machine']}). Each remote "
        f"round starts from an empty mirror. {r['rounds']} rounds of {r['steps_per_round']} steps per mode, "
        "interleaved; medians. Produced by `python benchmarks/remote_store.py`.",
        "",
        "| reading | median s/step | ratio to local | longest step (s) | first step (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        lines.append(f"| {LABELS[mode].format(prefetch=r['prefetch'])} | {r['median_step_s'][mode]:.3f} | "
                     f"{r['median_ratio_to_local'][mode]:.2f} | {r['median_longest_step_s'][mode]:.2f} | "
                     f"{r['median_first_step_s'][mode]:.2f} |")
    lines += [
        "",
        "Step times leave out each round's first step (the DataLoader's start and, for a URL, the first window "
        "of shards, which nothing can fetch earlier); it is the last column. The longest step shows the stalls: "
        "without fetching ahead, the first batch of each window of shards waits for their downloads.",
        "",
        "Ratios to local, round by round (the spread is the machine's noise: its 1-minute load average was "
        f"{r['load_average'][0]:.1f} before and {r['load_average'][1]:.1f} after, on {os.cpu_count()} cores):",
        "",
    ]
    for mode in MODES[1:]:
        lines.append(f"- {mode}: " + ", ".join(f"{x:.2f}" for x in r["ratios_to_local"][mode]))
    (out / "remote_store.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
