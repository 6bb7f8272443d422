"""The teacher job: run a causal LM over a corpus once and store its next-token distributions.

:class:`TeacherJob` reads as its steps: load the teacher (:func:`load_teacher`), index the corpus
(:func:`stream_corpus`: one pass, or the index a resumed store saved), open (or resume) each store,
run the teacher shard by shard, each shard's rows rebuilt from the input as it comes, with the
writes overlapped in the background, and finish each store with its manifest written last. One job can
write several stores from one teacher pass (same teacher and corpus, other targets or formats);
``run_cache`` and ``cache_many`` are its one-call forms, and the benchmarks build the same object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from softcache.background import BackgroundWriter
from softcache.config import CacheConfig
from softcache.chat import read_chat_template
from softcache.corpus import CorpusRows, PackedCorpus, read_rows
from softcache.mixture import Mixture, parse_weights
from softcache.corpus_documents import Recipe, pack_rows
from softcache.corpus_stream import StreamedCorpus, corpus_key, index_corpus, read_index, save_index
from softcache.distributed import Ranks, barrier, broadcast, on_main, process_group
from softcache.errors import SoftcacheError
from softcache.head import KeptHead
from softcache.logs import note, notes
from softcache.models import max_positions, output_vocab, resolve_device, resolve_dtype
from softcache.packing import forward_documents, uses_varlen
from softcache.placement import output_device, plan, where
from softcache.store import Layout, StoreWriter
from softcache.store.manifest import CorpusSection, TeacherSection, TokenizerSection
from softcache.store.registry import storage_section
from softcache.teacher import TeacherSource, identity, load_model, load_tokenizer, resolve_source
from softcache.tokenizer import tokenizer_fingerprint

log = logging.getLogger(__name__)
# Settings every store of one teacher pass shares (the rest describe each store's own targets and files).
PASS_SETTINGS = ("teacher", "gguf_file", "data", "weights", "mix_stop", "streaming", "text_column", "split",
                 "input_shape", "chat_template", "train_on", "packing", "long", "skip_bad_rows", "seq_len",
                 "max_sequences", "batch_size", "shard_size", "device", "device_map", "max_memory", "gpus_per_rank",
                 "offload_folder", "dtype")


@dataclass
class CacheResult:
    """What a teacher job did for one store; ``summary()`` is its one-line report."""

    manifest: dict
    out: str
    sequences_written: int
    seconds: float
    already_complete: bool

    def summary(self) -> str:
        totals = self.manifest["totals"]
        if self.already_complete:
            return f"{self.out} is already complete: {totals['sequences']:,} sequences, nothing to do"
        tokens = self.sequences_written * self.manifest["layout"]["seq_len"]
        rate = tokens / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"wrote {self.sequences_written:,} sequences ({tokens:,} tokens) in {self.seconds:.1f} s "
            f"({rate:,.0f} tokens/s); store {self.out}: {totals['sequences']:,} sequences, "
            f"{len(self.manifest['shards'])} shards, {totals['data_bytes'] / 1e6:,.1f} MB, "
            f"{totals['bytes_per_token']:.1f} bytes/token"
        )


@dataclass
class Teacher:
    """A loaded teacher: the model in eval mode on its device(s), its tokenizer and what it is."""

    source: TeacherSource
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    """Where the input ids go and the logits come out: the model's device, or for a teacher placed by
    --device-map its output head's (softcache.placement.output_device)."""
    identity: TeacherSection
    vocab_size: int
    """Logits per position."""
    offload: tempfile.TemporaryDirectory | None = None
    """The folder holding a placed teacher's layers on disk; removed by :meth:`close`."""

    def close(self) -> None:
        """Remove the offload folder (the model cannot run after this)."""
        if self.offload is not None:
            self.offload.cleanup()


def load_teacher(config: CacheConfig, ranks: Ranks = Ranks(), tokenizer=None) -> Teacher:
    """Resolve ``--teacher``/``--device``/``--dtype`` and load the model (and its tokenizer, unless
    given) on this rank's device, or over this rank's devices with ``--device-map`` (softcache.placement)."""
    source = resolve_source(config.teacher, config.gguf_file)
    placement = None if config.device_map is None else plan(config.device_map, config.max_memory,
                                                            config.gpus_per_rank, ranks.local_rank, ranks.local_world)
    device = ranks.device(resolve_device(config.device)) if placement is None else placement.compute_device
    dtype = resolve_dtype(config.dtype, device)
    where_to = f"on {device}" if placement is None else f"placed by --device-map {placement.name}"
    note(ranks, f"teacher {source.name} {where_to} ({str(dtype).removeprefix('torch.')})"
         + (f", {ranks.world} ranks" if ranks.world > 1 else ""))
    tokenizer = tokenizer or load_tokenizer(source)
    # Layers placed on disk that the checkpoint cannot serve in place go to a folder of this job's own.
    offload = None if placement is None else tempfile.TemporaryDirectory(
        prefix="softcache-offload-", dir=config.offload_folder, ignore_cleanup_errors=True)
    try:
        model = load_model(source, device, dtype, config.progress and ranks.main, placement, offload and offload.name)
    except BaseException:
        if offload is not None:
            offload.cleanup()
        raise
    if placement is not None:
        device = output_device(model)
        note(ranks, f"teacher placed on {where(model)}; logits on {device}")
    return Teacher(source, model, tokenizer, device, identity(source, model, dtype), output_vocab(model), offload)


def pack_corpus(config: CacheConfig, tokenizer, ranks: Ranks = Ranks()) -> PackedCorpus:
    """``--data`` read, tokenized or rendered with the teacher's tokenizer and packed into ``--seq-len``
    sequences in memory (softcache.corpus_documents; the benchmarks' way to hand one corpus to
    several jobs; the job itself streams: :func:`stream_corpus`)."""
    template = read_chat_template(config.chat_template)
    rows = read_corpus(config)
    if isinstance(rows, Mixture):
        raise SoftcacheError("a mix of corpora (--weights) is read streamed (stream_corpus), not packed in memory")
    corpus = pack_rows(rows, tokenizer, config.seq_len, max_sequences=config.max_sequences, train_on=config.train_on,
                       packing=config.packing, long=config.long, chat_template=template,
                       skip_bad_rows=config.skip_bad_rows, progress=config.progress and ranks.main)
    note(ranks, f"corpus {rows.source}: {corpus.summary()}")
    return corpus


def read_corpus(config: CacheConfig) -> CorpusRows | Mixture:
    """The rows of ``--data``: one corpus, several read one after the other, or several mixed by
    ``--weights`` (softcache.mixture)."""
    shape = None if config.input_shape == "auto" else config.input_shape
    corpora = config.corpora()
    if config.weights is None:
        return read_rows(corpora, config.text_column, config.split, shape, config.streaming)
    sources = [read_rows(corpus, config.text_column, config.split, shape, config.streaming) for corpus in corpora]
    return Mixture(sources, parse_weights(config.weights, len(corpora)), config.mix_stop)


def stream_corpus(config: CacheConfig, tokenizer, ranks: Ranks = Ranks(), saved_in: Sequence[str] = ()
                  ) -> StreamedCorpus:
    """``--data`` as the job reads it (softcache.corpus_stream): indexed by rank 0 in one pass, or, when
    a store in ``saved_in`` kept the index of this very corpus (same settings, tokenizer, file sizes
    and times), that index, read instead of the corpus; every rank gets it."""
    template = read_chat_template(config.chat_template)
    rows = read_corpus(config)
    recipe = Recipe.resolve(rows.shape, config.train_on, config.packing, config.long, rows.source,
                            template is not None)
    settings = {name: getattr(config, name) for name in ("data", "weights", "mix_stop", "streaming", "text_column",
                                                         "split", "seq_len", "shard_size", "max_sequences",
                                                         "skip_bad_rows")}
    key = corpus_key({**settings, "recipe": [str(recipe.shape), str(recipe.train_on), recipe.packing, recipe.long],
                      "chat_template": template}, rows, tokenizer_fingerprint(tokenizer))

    def index():
        for out in saved_in:
            if (found := read_index(out, key)) is not None:
                note(ranks, f"corpus {rows.source}: unchanged since {out} indexed it; reading only the shards to write")
                return found
        return index_corpus(rows, tokenizer, config.seq_len, config.shard_size, recipe,
                            max_sequences=config.max_sequences, chat_template=template,
                            skip_bad_rows=config.skip_bad_rows, progress=config.progress, key=key)

    found = broadcast(ranks, on_main(ranks, index))
    corpus = StreamedCorpus(found, rows, tokenizer, recipe, template, config.skip_bad_rows)
    note(ranks, f"corpus {rows.source}: {corpus.summary()}")
    return corpus


class TeacherJob:
    """One teacher pass writing one or more stores; ``run()`` does every step in order. Used step by
    step, the job is a context manager: leaving it releases the writer locks of the stores it opened.

    Args:
        configs: one :class:`CacheConfig` per store; they must agree on ``PASS_SETTINGS``.
        ranks: this process's place in a torchrun job (rank 0 creates and finishes the stores; each
            rank writes the shards whose index is its rank modulo the world size).
        teacher, corpus: already loaded ones to reuse (a benchmark timing several jobs); loaded
            from the first config when None.
    """

    def __init__(self, configs: CacheConfig | Sequence[CacheConfig], ranks: Ranks = Ranks(),
                 teacher: Teacher | None = None, corpus: PackedCorpus | StreamedCorpus | None = None):
        self.configs = [configs] if isinstance(configs, CacheConfig) else list(configs)
        if not self.configs:
            raise ValueError("a teacher job needs at least one store")
        for config in self.configs:
            config.validate()
        first = self.configs[0]
        for config in self.configs[1:]:
            differing = [name for name in PASS_SETTINGS if getattr(config, name) != getattr(first, name)]
            if differing:
                raise SoftcacheError(f"stores written by one teacher pass must share {', '.join(differing)}; "
                                     f"{config.out} differs from {first.out}")
        outs = [config.out for config in self.configs]
        if len(set(outs)) != len(outs):
            raise SoftcacheError("two stores of one teacher pass have the same --out")
        self.ranks = ranks
        self.teacher = teacher
        self.corpus = corpus
        self.writers: list[StoreWriter] = []
        self.head: KeptHead | None = None
        """The teacher's output layer kept in one buffer (softcache.head), probed by :meth:`load`; None where the
        model's own forward runs."""
        self.seconds = 0.0
        self.stats: dict[str, float] = {}
        """What the pass cost besides the forward (see :func:`teacher_loop`'s ``stats``)."""
        self._held = contextlib.ExitStack()  # the open writers: leaving the job releases their locks

    def __enter__(self) -> TeacherJob:
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()  # a job that stops early frees its stores (a killed one: see take_lock)

    # ---- steps ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the teacher and index the corpus (unless given), and check the settings against them."""
        first = self.configs[0]
        tokenizer = None
        if self.corpus is None:  # before the model: a bad --data fails in seconds
            tokenizer = self.teacher.tokenizer if self.teacher else load_tokenizer(resolve_source(first.teacher,
                                                                                                  first.gguf_file))
            self.corpus = stream_corpus(first, tokenizer, self.ranks,
                                        [config.out for config in self.configs])
        if self.teacher is None:
            self.teacher = load_teacher(first, self.ranks, tokenizer)
            self._held.callback(self.teacher.close)  # a placed teacher's offload folder goes with the job
        for config in self.configs:
            targets = config.targets_section()
            if problem := targets.spec.check(targets, self.teacher.vocab_size):
                raise SoftcacheError(problem)
        if (limit := max_positions(self.teacher.model)) is not None and first.seq_len > limit:
            raise SoftcacheError(f"--seq-len {first.seq_len} exceeds the teacher's {limit:,} positions")
        # Probed here, with the teacher's loading (two forwards of a few tokens), not at every teacher pass.
        self.head = KeptHead.for_model(self.teacher.model, self.teacher.device)

    def open_stores(self) -> None:
        """Create or resume each store (rank 0; the other ranks join once it has)."""
        layout = Layout(self.corpus.num_sequences, self.configs[0].seq_len, self.configs[0].shard_size)
        for config in self.configs:
            header = store_header(config, layout, self.teacher, self.corpus)

            def create(config=config, header=header) -> StoreWriter:
                writer = StoreWriter.open(config.out, header)
                if not writer.complete:
                    writer.save_tokenizer(self.teacher.tokenizer.save_pretrained)
                    if isinstance(self.corpus, StreamedCorpus):  # a resumed job need not read the corpus again
                        save_index(writer, self.corpus.index)
                return writer

            writer = on_main(self.ranks, create) or StoreWriter.open(config.out, header, join=True)
            self.writers.append(self._held.enter_context(writer))
        for writer, config in zip(self.writers, self.configs):
            done = writer.layout.num_shards - len(writer.pending)
            if not writer.complete and done:
                where = f"{config.out}: " if len(self.configs) > 1 else ""
                note(self.ranks, f"{where}resuming: {done} of {writer.layout.num_shards} shards already written")

    def write(self, on_batch=None) -> None:
        """The teacher loop over this rank's pending shards of every store still open."""
        jobs = [(w, c) for w, c in zip(self.writers, self.configs) if not w.complete]
        if not jobs:
            return
        mine = [i for i in sorted(set().union(*(w.pending for w, _ in jobs))) if i % self.ranks.world == self.ranks.rank]
        layout = jobs[0][0].layout
        total = sum(layout.shard_bounds(i)[1] for i in mine) * layout.seq_len
        with _progress(self.configs[0], total, disable=not self.ranks.main) as bar:
            started = time.perf_counter()
            teacher_loop(self.teacher.model, self.corpus, jobs, self.configs[0].batch_size,
                         self.teacher.device, on_batch=on_batch or bar.update, shards=mine, stats=self.stats,
                         head=self.head)
            self.seconds = time.perf_counter() - started
        barrier(self.ranks)  # every rank's shards are durable

    def finish(self) -> list[dict]:
        """Write each store's complete manifest (rank 0) and return the manifests on every rank."""

        def finish_all() -> list[dict]:
            manifests = []
            for writer in self.writers:
                writer.refresh()
                manifests.append(writer.finish())
            return manifests

        return broadcast(self.ranks, on_main(self.ranks, finish_all))

    def run(self) -> list[CacheResult]:
        """Load, open, write and finish; one :class:`CacheResult` per store."""
        with notes(self.configs[0].progress), self:
            self.load()
            self.open_stores()
            started_complete = [w.complete for w in self.writers]
            pending = [list(w.pending) for w in self.writers]
            self.write()
            manifests = self.finish()
        layout = self.writers[0].layout
        return [CacheResult(manifest, config.out, sum(layout.shard_bounds(i)[1] for i in todo), self.seconds,
                            already_complete=complete)
                for manifest, config, todo, complete in zip(manifests, self.configs, pending, started_complete)]


def run_cache(config: CacheConfig) -> CacheResult:
    """Run the teacher job described by ``config`` (creating or resuming ``config.out``).

    Under ``torchrun --nproc-per-node N``, each rank loads the teacher on its own device and writes
    the shards whose index is its rank modulo N; rank 0 creates the store, and writes the complete
    manifest once every rank has finished. A shard's content does not depend on the number of
    ranks, so the store's content digest does not either.
    """
    return cache_many([config])[0]


def cache_many(configs: Sequence[CacheConfig]) -> list[CacheResult]:
    """Write several stores in one teacher pass (one forward per batch for all of them); see :class:`TeacherJob`."""
    with process_group("gloo") as ranks:
        return TeacherJob(configs, ranks).run()


def teacher_loop(model, corpus: PackedCorpus | StreamedCorpus, jobs: list[tuple[StoreWriter, CacheConfig]],
                 batch_size: int, device: torch.device, on_batch=None, shards: list[int] | None = None,
                 stats: dict | None = None, head: KeptHead | None = None) -> None:
    """The teacher loop: forward once per batch, targets on the device for each store, hand-off to
    each store's background writer.

    Besides the targets, each shard records the teacher's summed cross-entropy on the true next
    tokens of the positions that teach (``teacher_nll``), so a store knows its teacher's loss on its
    own corpus.

    Args:
        corpus: the packed rows, read a shard at a time (``corpus.shard(first, count)``: ids, and for
            whole documents the positions whose targets are kept and the document numbers, with
            which the forward pass sees each document alone, softcache.packing; else None).
        jobs: (writer, config) pairs; every writer has the same layout, and each config gives its
            store's targets. One teacher pass writes every pending shard of every writer.
        batch_size: sequences per forward pass.
        device: where the input ids go (:attr:`Teacher.device`); the labels follow the logits.
        on_batch: called with the batch's token count after each forward pass.
        shards: write only these shard indices (this rank's part of a multi-rank job).
        stats: a dict to add this loop's costs besides the forward to: ``targets_seconds`` (wall seconds
            of extracting the targets and handing them off; on an accelerator, of queueing that work)
            and ``writer_cpu_seconds`` (CPU seconds of the background writers: copies to the host,
            encoding, compression, checksums and writes).
        head: the model's output layer kept in one buffer (:meth:`KeptHead.for_model`, on a CPU where the
            model allows it): the same logits without a fresh allocation per batch. None: the model's
            own forward.
    """
    layout = jobs[0][0].layout
    assert all(writer.layout == layout for writer, _ in jobs), "stores written together share one layout"
    # Each store's shards to write, as sets taken once: asking ``writer.pending`` (a list of every shard)
    # at each shard made the loop quadratic in the shard count (0.7 s a shard at 1T tokens' 3.8M shards).
    todo = [set(writer.pending) for writer, _ in jobs]
    pending = sorted(set().union(*todo))
    if shards is not None:
        pending = sorted(set(pending) & set(shards))
    targets = [config.targets_section() for _, config in jobs]
    varlen = uses_varlen(model)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        if head is not None:
            stack.enter_context(head.capturing())
        background = [BackgroundWriter(writer) for writer, _ in jobs]
        if stats is not None:  # registered first, so run last: once every writer has flushed
            stack.callback(lambda: stats.__setitem__(
                "writer_cpu_seconds", stats.get("writer_cpu_seconds", 0.0) + sum(b.cpu_seconds for b in background)))
        for writer_thread in background:
            stack.enter_context(writer_thread)
        ahead = stack.enter_context(_ShardsAhead(corpus, layout, pending))
        for index in pending:
            wanted = [(b, t) for b, t, store_todo in zip(background, targets, todo) if index in store_todo]
            first, count = layout.shard_bounds(index)
            input_ids, teach, segments = ahead.next()
            # Batches never straddle shards, so a resumed shard sees exactly the batches it would have.
            for lo in range(first, first + count, batch_size):
                hi = min(lo + batch_size, first + count)
                host_ids = input_ids[lo - first:hi - first]
                ids = torch.from_numpy(host_ids.astype(np.int64)).to(device, non_blocking=True)
                labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)  # the last position has none
                rows = {}
                if teach is not None:
                    rows["teach"] = torch.from_numpy(teach[lo - first:hi - first])
                    labels = labels.masked_fill(~rows["teach"].to(device, non_blocking=True), -100)
                if segments is None:
                    logits = model(input_ids=ids, use_cache=False).logits
                else:
                    rows["segments"] = torch.from_numpy(segments[lo - first:hi - first])
                    logits = forward_documents(functools.partial(model, use_cache=False), ids,
                                               rows["segments"].to(device, non_blocking=True), varlen).logits
                if head is not None:
                    logits = head.logits(*ids.shape)
                labels = labels.to(logits.device)  # a no-op unless a placed teacher's head is elsewhere
                # Positions with a label, counted on the host (asking the device would wait for it every batch).
                labelled = int(host_ids[:, :-1].size if teach is None else teach[lo - first:hi - first, :-1].sum())
                started = time.perf_counter()
                for writer_thread, section in wanted:
                    extracted = section.spec.extract(logits, labels, section, first_sequence=lo)
                    writer_thread.submit(index, lo, host_ids, {**for_storage(extracted), **rows},
                                         -extracted.label_logprobs.sum(dtype=torch.float64), labelled)
                if stats is not None:
                    stats["targets_seconds"] = stats.get("targets_seconds", 0.0) + time.perf_counter() - started
                del logits
                if on_batch is not None:
                    on_batch(ids.numel())


class _ShardsAhead:
    """Each pending shard's rows (``corpus.shard``), the next one built in a thread while the teacher runs
    on this one: a streamed corpus tokenizes a shard's documents again (the fast tokenizer releases the
    GIL), which would otherwise stall the device between shards."""

    def __init__(self, corpus, layout: Layout, pending: list[int]):
        from concurrent.futures import ThreadPoolExecutor

        self.corpus, self.layout, self.pending = corpus, layout, list(pending)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="softcache-corpus")
        self.upcoming = None

    def __enter__(self) -> _ShardsAhead:
        self._submit()
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # an interrupt does not wait for a shard no one needs

    def _submit(self) -> None:
        if self.pending:
            self.upcoming = self.pool.submit(self.corpus.shard, *self.layout.shard_bounds(self.pending.pop(0)))

    def next(self):
        rows = self.upcoming.result()
        self._submit()
        return rows


def for_storage(targets) -> dict:
    """Narrow on the device before the copy to the host: int32 ids and counts, float32 log-probs."""
    return {
        "ids": targets.ids.to(torch.int32),
        "values": targets.counts.to(torch.int32) if targets.counts is not None else targets.logprobs,
        "lengths": None if targets.lengths is None else targets.lengths.to(torch.int32),
    }


def store_header(config: CacheConfig, layout: Layout, teacher: Teacher, corpus: PackedCorpus | StreamedCorpus
                 ) -> dict:
    """Every manifest section except the shard table; the identity sections decide resumes."""
    whole = corpus.packing != "stream"  # whole documents: a teach mask and document starts
    encoding = dataclasses.replace(config.encoding(teacher.vocab_size), masked=whole, documents=whole)
    tokenizer = TokenizerSection(fingerprint=tokenizer_fingerprint(teacher.tokenizer), vocab_size=teacher.vocab_size,
                                 tokenizer_size=len(teacher.tokenizer), eos_token_id=teacher.tokenizer.eos_token_id)
    described = CorpusSection(**corpus.describe(),
                              text_column=None if all(corpus.startswith("builtin:") for corpus in config.corpora())
                              else config.text_column,
                              split=config.split)
    return {
        "storage": storage_section(config.format, layout, encoding),
        "layout": layout.to_dict(),
        "encoding": encoding.to_dict(),
        "targets": config.targets_section().to_dict(),
        "teacher": teacher.identity.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "corpus": described.to_dict(),
        "config": config.to_dict(),
    }


def _progress(config: CacheConfig, total: int, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="teacher", disable=disable or not config.progress,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

