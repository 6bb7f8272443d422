"""The ``softcache`` command line: thin click commands over the library.

Each command builds its config, calls one library function and prints the result. A user's
mistake reaches them as one ``error:`` line and exit status 1; ``softcache --debug ...`` shows the
traceback instead. An interrupt (Ctrl-C) is one ``error:`` line too, saying how to go on, and exit
status 130.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from collections.abc import Callable

import click

from softcache.config import RENAMED, CacheConfig, EvalConfig, TrainConfig
from softcache.errors import Interrupted, SoftcacheError
from softcache.logs import show_on_stderr
from softcache.settings import Setting, check_settings, load_settings, settings_of
from softcache.store import FORMATS
from softcache.store.encoding import SORTED_IDS
from softcache.version import __version__


class _Group(click.Group):
    """Turns SoftcacheError (and a few OS errors) into one line and exit status 1, a command-line
    usage error (a value of the wrong type, an unknown option) into one line and click's exit status
    2, and an interrupt (Ctrl-C) into one line and exit status 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            command = f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            for old, new in RENAMED.items():
                if isinstance(err, click.NoSuchOption) and err.option_name == f"--{old.replace('_', '-')}":
                    click.echo(f"error: --{old.replace('_', '-')} was replaced by {new}", err=True)
                    ctx.exit(2)
            click.echo(f"error: {' '.join(err.format_message().split())} (softcache{command} --help lists the "
                       "options)", err=True)
            ctx.exit(2)
        except (SoftcacheError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as err:  # a job's Interrupted says where it stopped and how to go on
            message = str(err) if isinstance(err, Interrupted) else "interrupted; rerun the same command to resume"
            click.echo(f"error: {message}", err=True)
            ctx.exit(130)


class _ConfigCommand(click.Command):
    """A command whose options are the fields of a config dataclass (see softcache.config.setting), plus
    ``--config FILE``. ``config`` is a function returning the dataclass: the options are built when the
    command is first parsed or shown, so ``softcache info`` does not import what they need (--loss reads
    its choices from softcache.losses, and the demo's config lives in softcache.demo; both import torch)."""

    def __init__(self, *args, config: Callable[[], type], **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.built = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self.built:
            cls = self.config()
            self.params[:0] = [_config_file_option(cls), *(_option(spec) for spec in settings_of(cls))]
            self.built = True
        return super().get_params(ctx)


def _option(spec: Setting) -> click.Option:
    """The click option of one config field: its flag, type, default, choices and help."""
    if spec.value_type is bool:  # --x/--no-x when on by default, else a plain --x switch
        decls = [f"{spec.flag}/--no-{spec.flag[2:]}" if spec.default else spec.flag, spec.name]
        return click.Option(decls, is_flag=True, default=spec.default, show_default=spec.default, help=spec.help)
    choices = spec.choice_list()
    kind = click.Choice(choices) if choices is not None else {str: click.STRING, int: click.INT,
                                                             float: click.FLOAT}[spec.value_type]
    if spec.many:  # given once: a string, as before; several times: the list
        return click.Option([spec.flag, spec.name], type=kind, multiple=True, required=spec.required, help=spec.help,
                            callback=lambda ctx, param, values: values[0] if len(values) == 1 else list(values) or None)
    if spec.required:
        return click.Option([spec.flag, spec.name], type=kind, required=True, help=spec.help)
    return click.Option([spec.flag, spec.name], type=kind, default=spec.default,
                        show_default=spec.default is not None, help=spec.help)


def _config_file_option(cls: type) -> click.Option:
    """``--config FILE``: its settings become the command's defaults (click's default_map), so a flag
    given on the command line wins over the file and the file over the field defaults."""

    def read(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
        if path is not None and not ctx.resilient_parsing:
            many = {spec.name for spec in settings_of(cls) if spec.many}  # click reads their default as a list
            loaded = {name: [value] if name in many and isinstance(value, str) else value
                      for name, value in load_settings(cls, path).items()}
            ctx.default_map = {**(ctx.default_map or {}), **loaded}

    return click.Option(["--config", "config_file"], metavar="FILE", is_eager=True, expose_value=False,
                        callback=read, help="Read settings from a YAML or JSON file that maps flag names (without the "
                        "leading --; - or _) to values. Flags given on the command line win over it.")


def _demo_config() -> type:
    from softcache.demo import DemoConfig  # imports torch, so only when the demo command is used

    return DemoConfig


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
    softcache verify  check a store's metadata, checksums and content
    softcache convert rewrite a store in the other format
    softcache train   distil a store into a student (no teacher in memory)
    softcache eval    CE, perplexity, KL and top-1 agreement of a model on a store
    """
    ctx.obj = {"debug": debug}
    show_on_stderr()  # the jobs' notes and warnings (softcache.logs)


@main.command(cls=_ConfigCommand, config=lambda: CacheConfig)
def cache(**options) -> None:
    """Run a teacher over a corpus once and write its next-token distributions, in compact form, to
    a sharded, checksummed store.

    For every position i of every packed sequence the store holds the teacher's distribution over the
    next token in compact form (--targets): by default --samples draws from it, kept as unique ids
    with counts (unbiased: the student learns the whole distribution); or its k most likely ids with
    log-probabilities normalised over the full vocabulary, so the mass outside them is known exactly;
    or top-p ids. The store records how it is coded; training reads it back with
    no settings to copy. Interrupt it at any time: the same command resumes after the last complete
    shard and produces the same shard files as an uninterrupted run.

    \b
    Example:
      softcache cache --teacher builtin:smollm2 --data builtin:python-docs \\
          --out runs/smol --seq-len 512 --max-sequences 64
    """
    from softcache.cache_job import run_cache
    from softcache.distributed import launched_as_main

    result = run_cache(CacheConfig(**options))
    if launched_as_main():  # one summary for a torchrun job
        click.echo(result.summary())


@main.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest with computed totals as JSON.")
def info(store: str, as_json: bool) -> None:
    """Summarise STORE: teacher, tokenizer, targets, size, bytes per token, whether it is complete. Given a
    view (softcache view), what a student of its tokenizer learns from: aligned positions, mapped mass."""
    from softcache.store import open_store

    if (Path(store) / "view.json").exists():
        return _view_info(store, as_json)
    opened = open_store(store, allow_incomplete=True)
    summary = _summary(opened)
    if as_json:
        click.echo(json.dumps({**opened.manifest, "summary": summary}, indent=2))
        return
    m, teacher, targets, encoding = opened.manifest, opened.teacher, opened.targets, opened.encoding
    state = "complete" if opened.complete else (
        f"INCOMPLETE: {len(opened.shards)} of {opened.layout.num_shards} "
        "shards written; rerun its softcache cache command to finish it")
    rows = [
        ("store", lambda: f"{store} ({opened.format.name}, format v{m['format_version']}, "
                          f"softcache {m.get('softcache_version')})"),
        ("state", lambda: state),
        ("teacher", lambda: teacher.name + (f" [{teacher.gguf_file}]" if teacher.gguf_file else "")
         + f" ({teacher.architecture}, {teacher.parameters:,} parameters, {teacher.dtype})"),
        ("tokenizer", lambda: f"vocab {opened.tokenizer.vocab_size:,}, fingerprint {opened.tokenizer.fingerprint[:16]}"),
        ("targets", lambda: f"{targets.describe()} at temperature {targets.temperature:g} "
                            f"(ids {encoding.ids}, values {encoding.values}, codec {_codec(opened.format.codec)})"),
        ("kind", lambda: f"{targets.kind}: {targets.spec.trade_off}"),
        ("sequences", lambda: f"{summary['sequences']:,} of {opened.layout.num_sequences:,} x "
                              f"{opened.layout.seq_len} tokens = {summary['tokens']:,} tokens"),
        ("shards", lambda: f"{len(opened.shards)} of {opened.layout.num_shards} "
                           f"({opened.layout.shard_size} sequences each)"),
        ("size", lambda: f"{summary['data_bytes'] / 1e6:,.2f} MB, {summary['bytes_per_token']:.1f} bytes/token"),
        ("corpus", lambda: f"{opened.corpus.source}, {opened.corpus.documents:,} documents, "
                           f"fingerprint {opened.corpus.fingerprint[:16]}"),
    ]
    corpus = opened.corpus
    if corpus.mix is not None:  # several corpora mixed by weight (softcache.mixture)
        rows.append(("mix", lambda: f"--mix-stop {corpus.mix['stop']}; " + ", ".join(
            f"{source['data']}: weight {source['weight']:.3g}, {source['share']:.1%} of tokens"
            f"{', started again ' + str(source['restarts']) + 'x' if source['restarts'] else ''}"
            for source in corpus.mix["sources"])))
    if corpus.packing is not None:  # rows rendered and packed (softcache.documents)
        rows += [
            ("input", lambda: f"{corpus.input_shape} rows"
             + (f", chat template sha256 {corpus.chat_template_sha256[:16]}" if corpus.chat_template_sha256 else "")
             + f"; {corpus.bad_rows:,} bad rows skipped"),
            ("teaching", lambda: f"{corpus.teaching_positions:,} positions "
                                 f"({corpus.teaching_positions / opened.layout.num_tokens:.1%} of "
                                 f"{opened.layout.num_tokens:,}; --train-on {corpus.train_on}), padding "
                                 f"{corpus.padding_positions / opened.layout.num_tokens:.1%}"),
            ("packing", lambda: f"{corpus.packing}; longer than a sequence (--long {corpus.long}): "
                                f"{corpus.long_truncated:,} truncated, {corpus.long_split:,} split, "
                                f"{corpus.long_dropped:,} dropped"),
        ]
    rows = [(name, _or_not_recorded(describe)) for name, describe in rows]
    if opened.totals is not None and opened.totals.teacher_ce is not None:
        ce = opened.totals.teacher_ce
        where = "teaching position" if opened.encoding.masked else "token"
        rows.append(("teacher CE", f"{ce:.4f} nats per {where} on this corpus (perplexity {math.exp(ce):.2f})"))
    if opened.totals is not None:
        rows.append(("content", f"sha256 {opened.totals.content_sha256}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def _view_info(path: str, as_json: bool) -> None:
    from softcache.view import View

    view = View(path, verify=False)
    if as_json:
        click.echo(json.dumps({**view.manifest, "summary": {"aligned_share": view.counts.aligned_share,
                                                             "mapped_share": view.counts.mapped_share}}, indent=2))
        return
    m, counts = view.manifest, view.counts
    rows = [
        ("view", f"{path} ({m['format']}, format v{m['format_version']})"),
        ("store", f"{m['store']['path']}, content sha256 {m['store']['content_sha256'][:16]}"),
        ("student", f"tokenizer of {m['student']['size']:,} tokens, fingerprint "
                    f"{m['student']['tokenizer_fingerprint'][:16]}; {m['student']['mapped_ids']:,} of the teacher's "
                    f"{m['student']['teacher_ids']:,} tokens have one of the same bytes"),
        ("sequences", f"{counts.sequences:,}, {counts.positions:,} student positions (the longest sequence "
                      f"{view.max_length:,} tokens), {counts.text_bytes:,} bytes of text"),
        ("aligned", f"{counts.aligned_share:.1%} of the student's positions meet a teacher position (they get the "
                    "KD term; every position gets cross-entropy)"),
        ("mapped", f"{counts.mapped_share:.1%} of the teacher's cached mass at those positions is on tokens the "
                   "student has (exact projection; the rest joins the tail, or --cross-loss uld/hybrid)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


@main.command(name="view")
@click.argument("store", type=click.Path())
@click.option("--tokenizer", required=True,
              help="The student's tokenizer: a directory holding its files (a student's model directory), or a hub "
                   "id found in the local Hugging Face cache.")
@click.option("--out", required=True, type=click.Path(),
              help="Where to write the view: a new directory, beside the store (never inside it).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def view_(store: str, tokenizer: str, out: str, progress: bool) -> None:
    """Build STORE's view in another tokenizer, for students of that tokenizer (softcache train
    --tokenizers cross --view OUT). Done once per tokenizer, on CPU, with no teacher: the store's token
    ids are turned back into text, tokenized by the student's tokenizer, and the positions where both
    tokenizations meet are recorded with a map between the two vocabularies."""
    from softcache.store import open_store
    from softcache.student import load_tokenizer
    from softcache.view import build_view

    opened = open_store(store)
    opened.check_tokenizer()
    if Path(out).resolve().is_relative_to(Path(store).resolve()):
        raise SoftcacheError(f"--out {out} is inside the store {store}; a view lives beside a store, never in it")
    built = build_view(opened, load_tokenizer(tokenizer, "--tokenizer"), out, progress)
    click.echo(f"view {out}: {built.counts.describe()}")


def _summary(opened) -> dict:
    sequences = len(opened)
    data_bytes = sum(s.bytes for s in opened.shards)
    tokens = sequences * opened.layout.seq_len
    summary = {"complete": opened.complete, "sequences": sequences, "tokens": tokens, "shards": len(opened.shards),
               "data_bytes": data_bytes, "bytes_per_token": data_bytes / tokens if tokens else 0.0}
    if opened.corpus.teaching_positions is not None:
        summary["teaching_share"] = opened.corpus.teaching_positions / max(opened.layout.num_tokens, 1)
    return summary


def _or_not_recorded(describe) -> str:
    """A row of ``info``; a manifest written by hand or by an older tool may lack some fields."""
    try:
        return describe()
    except (KeyError, TypeError):
        return "(not recorded in the manifest)"


def _codec(codec: dict | None) -> str:
    codec = codec or {"name": "none"}
    name = codec["name"] + (f"-{codec['cname']}" if "cname" in codec else "")
    return name + (f"-{codec['level']}" if "level" in codec else "") + ("+shuffle" if codec.get("shuffle") else "")


@main.command()
@click.argument("store", type=click.Path())
def verify(store: str) -> None:
    """Check everything in STORE: the manifest's seal, its shard table against its layout and totals,
    every file against its sha256, every shard's columns against its content digest, and that no data
    file is unlisted. Exits 1 naming each problem, or if the store is incomplete."""
    from softcache.store.reader import Store

    opened = Store(store, allow_incomplete=True, refuse_inconsistent=False)
    problems = opened.verify()
    files = sum(len(s.files) for s in opened.shards) + len(opened.tokenizer_files)
    if problems:
        for problem in problems:
            click.echo(f"error: {store}: {problem}", err=True)
        sys.exit(1)
    click.echo(f"{store}: OK ({len(opened.shards)} shards, {files} files checked)")


@main.command()
@click.argument("source", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--format", "format_", type=click.Choice(tuple(FORMATS)), required=True,
              help="Format of the new store.")
@click.option("--ids", type=click.Choice(SORTED_IDS), default=None,
              help="Id code of the new store: delta or ranked (smaller), which hold the same content "
                   "[default: the source's].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def convert(source: str, dest: str, format_: str, ids: str | None, progress: bool) -> None:
    """Rewrite the complete store SOURCE as DEST in another format or id code, with identical content
    (the content digest is checked). Resumable like a teacher job."""
    from tqdm.auto import tqdm

    from softcache.store import open_store
    from softcache.store.convert import convert_store

    total = open_store(source).layout.num_shards
    with tqdm(total=total, unit="shard", desc="convert", disable=not progress, file=sys.stderr, delay=1) as bar:
        manifest = convert_store(source, dest, format_, on_shard=lambda _: bar.update(1), ids=ids)
    totals = manifest["totals"]
    click.echo(f"converted {source} -> {dest} ({format_}): {totals['sequences']:,} sequences, "
               f"{totals['bytes_per_token']:.1f} bytes/token, content sha256 {totals['content_sha256'][:16]} (equal)")


@main.command(cls=_ConfigCommand, config=lambda: TrainConfig)
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


@main.command(name="eval", cls=_ConfigCommand, config=lambda: EvalConfig)
def eval_(**options) -> None:
    """Cross-entropy and perplexity on the true tokens, forward KL to the cached teacher targets and
    top-1 agreement with the teacher, for any saved model on any store."""
    import torch

    from softcache.evaluate import evaluate
    from softcache.models import resolve_device
    from softcache.store import open_store
    from softcache.student import build_student, check_compatible

    config = EvalConfig(**options)
    config.validate()
    store = open_store(config.store)
    model = build_student(config.model, seed=0, flag="--model")
    view = None
    if config.view:
        from softcache.student import student_tokenizer
        from softcache.tokenizer import tokenizer_fingerprint
        from softcache.view import View

        view = View(config.view)
        view.check_store(store)
        view.check_tokenizer(tokenizer_fingerprint(student_tokenizer(config.model, "--model")), f"--model {config.model}",
                             "--view")
    check_compatible(model, store, config.model, "cross" if view else "same", flag="--model", view=view)
    device = resolve_device(config.device)
    metrics = evaluate(model.to(device), config.store, stop=config.max_sequences, batch_size=config.batch_size,
                       device=device, temperature=store.targets.temperature,
                       autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, view=config.view)
    if config.as_json:
        click.echo(json.dumps(metrics))
    else:
        click.echo(f"ce {metrics['ce']:.4f}  perplexity {metrics['perplexity']:.2f}  kl {metrics['kl']:.4f}  "
                   f"top1_agreement {metrics['top1_agreement']:.4f}  bits_per_byte {metrics['bits_per_byte']:.4f}  "
                   f"tokens {metrics['tokens']:,}")


@main.command(cls=_ConfigCommand, config=_demo_config)
def demo(**options) -> None:
    """The whole point in one command: cache SmolLM2-135M-Instruct's next-token distributions over
    Python's documentation once, train the same small student twice (cross-entropy only, and
    distilled from the store), and print everyone's held-out loss. About 10 minutes on two CPU
    cores; a rerun reuses what is finished."""
    from softcache.demo import DemoConfig, run_demo

    config = DemoConfig(**options)
    check_settings(config)
    result = run_demo(config)
    click.echo(result.table())
    click.echo(f"report: {result.report}")
