"""Benchmark: bytes per token and fidelity of every target kind and encoding, and decode speed.

One teacher pass (SmolLM2-135M-Instruct on the built-in corpus) keeps, per position, the float32
top-128 log-probabilities (top-16 and top-64 are its prefixes: the same entries a k = 16 or 64 job
writes), top-p sets derived from them, and systematic sampled draws (N = 16, 24, 50, 100). Each is then encoded
with every id and value code, written as a real store (zarr with the default codec, and arrow),
read back, and compared with the float32 targets it came from:
  bytes/token   the store's data files (everything but the manifest and tokenizer) / tokens
  mean/max KL   KL(float32 targets || decoded), over the stored ids plus the tail bucket
  reader tok/s  StoreDataset batches (4 x seq_len, decoded to torch) per second, 0 workers, zarr

    python benchmarks/encodings.py                # about 3 minutes on 2 CPU cores

Writes benchmarks/results/encodings.md (and .json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache.cache_job import load_teacher, pack_corpus
from softcache.config import CacheConfig
from softcache.data import StoreDataset
from softcache.store import Encoding, Layout, StoreWriter, open_store
from softcache.store.encoding import encode
from softcache.store.manifest import CorpusSection, TokenizerSection
from softcache.store.registry import storage_section
from softcache.tokenizer import tokenizer_fingerprint
from softcache.store.zarr_format import DEFAULT_CODEC as ZARR_CODEC
from softcache.targets import extract_targets, sampled_targets, sequence_seed

HERE = Path(__file__).parent
TOPK = (16, 64, 128)
TOPP = ((0.9, 128), (0.99, 128))
SAMPLES = (16, 24, 50, 100)


def teacher_targets(model, input_ids: np.ndarray, batch_size: int) -> dict:
    """Float32 top-max(TOPK) targets and sampled draws for every sequence, in one teacher pass."""
    kmax = max(TOPK)
    top_ids, top_values, sampled = [], [], {n: [] for n in SAMPLES}
    with torch.inference_mode():
        for lo in range(0, len(input_ids), batch_size):
            ids = torch.from_numpy(input_ids[lo : lo + batch_size].astype(np.int64))
            logits = model(input_ids=ids, use_cache=False).logits
            top = extract_targets(logits, kmax)
            top_ids.append(top.ids.numpy())
            top_values.append(top.logprobs.numpy())
            seeds = [sequence_seed(0, lo + b) for b in range(len(ids))]
            for n in SAMPLES:
                draws = sampled_targets(logits, n, seeds)
                sampled[n].append((draws.ids.numpy(), draws.counts.numpy(), draws.lengths.numpy()))
            print(f"teacher: {lo + len(ids)}/{len(input_ids)} sequences", flush=True)
    return {"ids": np.concatenate(top_ids), "values": np.concatenate(top_values),
            "sampled": {n: tuple(np.concatenate(parts) for parts in zip(*chunks)) for n, chunks in sampled.items()}}


def variants(data: dict, vocab: int):
    """(name, Encoding, encode() keyword arguments) for every kind and code."""
    for k in TOPK:
        for ids_code in ("plain", "delta", "bitpack", "ranked"):
            for values in ("float16", "log8"):
                yield (f"top-{k}", Encoding("topk", k, vocab, ids_code, values),
                       {"ids": data["ids"][..., :k], "values": data["values"][..., :k]})
    for p, k in TOPP:
        probs = np.exp(data["values"][..., :k].astype(np.float64))
        lengths = np.clip((np.cumsum(probs, -1) - probs < p).sum(-1), 1, k)
        padding = np.arange(k) >= lengths[..., None]
        ids = np.where(padding, data["ids"][..., :1], data["ids"][..., :k])
        values = np.where(padding, -np.inf, data["values"][..., :k]).astype(np.float32)
        for ids_code in ("delta", "ranked"):
            for values_code in ("float16", "log8"):
                yield (f"top-p {p} (k <= {k})", Encoding("topp", k, vocab, ids_code, values_code),
                       {"ids": ids, "values": values, "lengths": lengths})
    for n in SAMPLES:
        ids, counts, lengths = data["sampled"][n]
        for ids_code in ("plain", "delta", "ranked"):
            yield (f"sampled N={n}", Encoding("sampled", min(n, vocab), vocab, ids_code, "counts", n),
                   {"ids": ids, "values": counts, "lengths": lengths})


def described(teacher, input_ids: np.ndarray) -> dict:
    """The manifest sections that say where the targets came from: the teacher, its tokenizer, the corpus."""
    return {"teacher": teacher.identity.to_dict(),
            "tokenizer": TokenizerSection(fingerprint=tokenizer_fingerprint(teacher.tokenizer),
                                          vocab_size=teacher.vocab_size).to_dict(),
            "corpus": CorpusSection(source="builtin:python-docs",
                                    fingerprint=hashlib.sha256(input_ids.tobytes()).hexdigest()).to_dict()}


def write(root: Path, format_name: str, encoding: Encoding, input_ids: np.ndarray, targets: dict,
          origin: dict) -> float:
    """Write one store (one shard) and return its bytes per token; ``origin``: :func:`described`."""
    shutil.rmtree(root, ignore_errors=True)
    layout = Layout(len(input_ids), input_ids.shape[1], len(input_ids))
    header = {"storage": storage_section(format_name, layout, encoding), "layout": layout.to_dict(),
              "encoding": encoding.to_dict(), "targets": {"kind": encoding.kind, "temperature": 1.0}, **origin}
    writer = StoreWriter.open(root, header)
    writer.write_shard(0, encode(encoding, input_ids, **targets))
    return writer.finish()["totals"]["bytes_per_token"]


def fidelity(root: Path, targets: dict) -> dict:
    """KL(float32 source || decoded) per position, tail bucket included (ids matched per position)."""
    store = open_store(root)
    decoded = store.read(0, len(store))
    source_values = targets["values"].astype(np.float64)
    padding = np.iinfo(np.int64).max  # padding sorts last on both sides
    source_ids = np.where(source_values > -np.inf, targets["ids"], padding)
    decoded_ids = np.where(decoded["target_logprobs"] > -np.inf, decoded["target_ids"], padding)
    a = np.argsort(source_ids, axis=-1, kind="stable")
    b = np.argsort(decoded_ids, axis=-1, kind="stable")
    assert np.array_equal(np.take_along_axis(source_ids, a, -1), np.take_along_axis(decoded_ids, b, -1))
    t = np.take_along_axis(source_values, a, -1)
    q = np.take_along_axis(decoded["target_logprobs"].astype(np.float64), b, -1)
    p_t, p_q = np.exp(t), np.exp(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        head = np.where(p_t > 0, p_t * (t - q), 0.0).sum(-1)
        tail_t, tail_q = np.clip(1 - p_t.sum(-1), 0, None), np.clip(1 - p_q.sum(-1), 1e-300, None)
        tail = np.where(tail_t > 0, tail_t * np.log(np.maximum(tail_t, 1e-300) / tail_q), 0.0)
    kl = head + tail
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def reader_speed(root: Path, batch_size: int = 4, repeats: int = 3) -> float:
    """Tokens per second of StoreDataset over the whole store (one epoch, 0 workers), median of repeats."""
    times = []
    for _ in range(repeats):
        dataset = StoreDataset(str(root), batch_size, epochs=1)
        started = time.perf_counter()
        tokens = sum(int(batch["mask"].sum()) for batch in DataLoader(dataset, batch_size=None))
        times.append(time.perf_counter() - started)
    return tokens / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:smollm2")
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", default=str(HERE / "out" / "encodings"))
    args = parser.parse_args()
    work = Path(args.work)

    setup = CacheConfig(teacher=args.teacher, data="builtin:python-docs", out=str(work / "unused"),
                        seq_len=args.seq_len, max_sequences=args.sequences, device="cpu", progress=False)
    teacher = load_teacher(setup)  # the teacher job's own loading and packing
    input_ids = pack_corpus(setup, teacher.tokenizer).input_ids
    vocab = teacher.vocab_size
    data = teacher_targets(teacher.model, input_ids, args.batch_size)
    origin = described(teacher, input_ids)

    rows = []
    for name, encoding, targets in variants(data, vocab):
        label = f"{name}-{encoding.ids}-{encoding.values}".replace(" ", "_")
        row = {"targets": name, "ids": encoding.ids, "values": encoding.values}
        for format_name in ("zarr", "arrow"):
            row[f"{format_name}_bytes_per_token"] = write(work / f"{label}-{format_name}", format_name, encoding,
                                                          input_ids, targets, origin)
        if encoding.kind != "sampled":
            row.update(fidelity(work / f"{label}-zarr", targets))
        else:
            row["entries_per_position"] = float(targets["lengths"].mean())
        row["reader_tokens_per_s"] = reader_speed(work / f"{label}-zarr")
        rows.append(row)
        print(row, flush=True)
    student = HERE / "results" / "train_step.json"
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "teacher": args.teacher, "vocab": vocab, "tokens": int(input_ids.size), "seq_len": args.seq_len, "rows": rows,
        "student_tokens_per_s": json.loads(student.read_text()).get("student_tokens_per_s") if student.exists() else None,
    }
    write_report(results)


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "encodings.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Target kinds and encodings: bytes per token, fidelity, decode speed",
        "",
        f"Teacher {results['teacher']} (vocab {results['vocab']:,}) on builtin:python-docs, "
        f"{results['tokens']:,} tokens (seq_len {results['seq_len']}), one store shard each; CPU: {results['machine']}. "
        f"zarr uses the default codec ({ZARR_CODEC['name']} {ZARR_CODEC.get('cname', '')}-{ZARR_CODEC['level']}"
        f"{' + byte shuffle' if ZARR_CODEC.get('shuffle') == 'shuffle' else ''}); arrow is uncompressed (read zero-copy). Sampled "
        "targets are systematic draws. "
        "KL is KL(float32 targets || decoded targets) over the stored ids plus the tail bucket, per position; "
        "sampled targets store exact counts (lossless), so they list entries per position instead. Reader: "
        "`StoreDataset` batches of 4 sequences decoded to torch, 0 workers, zarr. Produced by "
        "`python benchmarks/encodings.py`.",
        "",
        "| targets | ids | values | zarr B/token | arrow B/token | mean KL (nats) | max KL | entries/position "
        "| reader tok/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        kl = (f"{row['mean_kl']:.1e} | {row['max_kl']:.1e}" if "mean_kl" in row else "lossless | lossless")
        entries = f"{row['entries_per_position']:.1f}" if "entries_per_position" in row else ""
        lines.append(f"| {row['targets']} | {row['ids']} | {row['values']} | {row['zarr_bytes_per_token']:.1f} | "
                     f"{row['arrow_bytes_per_token']:.1f} | {kl} | {entries} | {row['reader_tokens_per_s']:,.0f} |")
    if results.get("student_tokens_per_s"):
        slowest = min(row["reader_tokens_per_s"] for row in results["rows"])
        lines += ["", f"The slowest reader here is {slowest / results['student_tokens_per_s']:.0f}x the "
                      f"{results['student_tokens_per_s']:,.0f} tokens/s that the benchmark student trains at "
                      "([train_step.md](train_step.md))."]
    lines.append("")
    (out / "encodings.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
