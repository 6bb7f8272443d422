"""The teacher job: run a causal LM over a corpus once and store its next-token distributions.

Reads top to bottom: resolve the teacher, pack the corpus, open (or resume) the store, run the
teacher shard by shard with writes overlapped in the background, write the manifest last.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from softcache.background import BackgroundWriter
from softcache.config import CacheConfig
from softcache.corpus import iter_documents, pack
from softcache.distributed import Ranks, barrier, broadcast, on_main, process_group
from softcache.errors import SoftcacheError
from softcache.store import Encoding, Layout, StoreWriter
from softcache.store.registry import storage_section
from softcache.targets import extract_targets, sampled_targets, sequence_seed, topp_targets
from softcache.teacher import (
    identity,
    load_model,
    load_tokenizer,
    max_positions,
    output_vocab_size,
    resolve_device,
    resolve_dtype,
    resolve_source,
    tokenizer_fingerprint,
)


@dataclass
class CacheResult:
    """What a teacher job did; ``summary()`` is its one-line report."""

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


def run_cache(config: CacheConfig) -> CacheResult:
    """Run the teacher job described by ``config`` (creating or resuming ``config.out``).

    Under ``torchrun --nproc-per-node N``, each rank loads the teacher on its own device and writes
    the shards whose index is its rank modulo N; rank 0 creates the store, and writes the complete
    manifest once every rank has finished. A shard's content does not depend on the number of
    ranks, so the store's content digest does not either.
    """
    config.validate()
    with process_group("gloo") as ranks:
        return _run_cache(config, ranks)


def _run_cache(config: CacheConfig, ranks: Ranks) -> CacheResult:
    log = (lambda message: _log(config, message)) if ranks.main else (lambda message: None)
    source = resolve_source(config.teacher, config.gguf_file)
    device = ranks.device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    log(f"teacher {source.name} on {device} ({str(dtype).removeprefix('torch.')})"
        + (f", {ranks.world} ranks" if ranks.world > 1 else ""))

    tokenizer = load_tokenizer(source)
    corpus = pack(iter_documents(config.data, config.text_column, config.split), tokenizer,
                  config.seq_len, config.max_sequences, source=config.data)
    log(f"corpus {config.data}: {corpus.documents:,} documents, {len(corpus.input_ids):,} sequences of "
        f"{config.seq_len} tokens ({corpus.dropped_tokens:,} trailing tokens dropped)")

    model = load_model(source, device, dtype, config.progress and ranks.main)
    vocab = output_vocab_size(model)
    if config.targets != "sampled" and config.k > vocab:
        raise SoftcacheError(f"--k {config.k} is larger than the teacher's vocabulary ({vocab:,} ids)")
    if (limit := max_positions(model)) is not None and config.seq_len > limit:
        raise SoftcacheError(f"--seq-len {config.seq_len} exceeds the teacher's {limit:,} positions")

    layout = Layout(len(corpus.input_ids), config.seq_len, config.shard_size)
    encoding = config.encoding(vocab)
    header = store_header(config, layout, encoding, identity(source, model, dtype), tokenizer, vocab, corpus.describe())

    def create() -> StoreWriter:
        writer = StoreWriter.open(config.out, header)
        if not writer.complete:
            writer.save_tokenizer(tokenizer.save_pretrained)
        return writer

    writer = on_main(ranks, create) or StoreWriter.open(config.out, header, join=True)
    if writer.complete:
        return CacheResult(writer.header, config.out, 0, 0.0, already_complete=True)

    try:
        pending = writer.pending
        if len(pending) < layout.num_shards:
            log(f"resuming: {layout.num_shards - len(pending)} of {layout.num_shards} shards already written")
        mine = [index for index in pending if index % ranks.world == ranks.rank]
        todo = sum(layout.shard_bounds(i)[1] for i in mine)
        bar = _progress(config, total=todo * config.seq_len, disable=not ranks.main)
        started = time.perf_counter()
        cache_many(model, corpus.input_ids, [(writer, config)], config.batch_size, device, on_batch=bar.update,
                   shards=mine)
        seconds = time.perf_counter() - started
        bar.close()
        barrier(ranks)  # every rank's shards are durable

        def finish() -> dict:
            writer.refresh()
            return writer.finish()

        manifest = broadcast(ranks, on_main(ranks, finish))
    finally:
        writer.release_lock()  # a job that stops early frees the store (a killed one: see take_lock)
    written = sum(layout.shard_bounds(i)[1] for i in pending)
    return CacheResult(manifest, config.out, written, seconds, already_complete=False)


def cache_shards(model, input_ids: np.ndarray, writer: StoreWriter, config: CacheConfig, device: torch.device,
                 on_batch=None) -> None:
    """The teacher loop for one store: :func:`cache_many` with a single job."""
    cache_many(model, input_ids, [(writer, config)], config.batch_size, device, on_batch)


def cache_many(model, input_ids: np.ndarray, jobs: list[tuple[StoreWriter, CacheConfig]], batch_size: int,
               device: torch.device, on_batch=None, shards: list[int] | None = None) -> None:
    """The teacher loop: forward once per batch, targets on the device for each store, hand-off to
    each store's background writer.

    Besides the targets, each shard records the teacher's summed cross-entropy on the true next
    tokens (``teacher_nll``), so a store knows its teacher's loss on its own corpus.

    Args:
        input_ids: the [num_sequences, seq_len] packed corpus.
        jobs: (writer, config) pairs; every writer has the same layout, and each config gives its
            store's targets (kind, k, top_p, samples, seed, temperature). One teacher pass writes
            every pending shard of every writer.
        batch_size: sequences per forward pass.
        on_batch: called with the batch's token count after each forward pass.
        shards: write only these shard indices (this rank's part of a multi-rank job).
    """
    layout = jobs[0][0].layout
    assert all(writer.layout == layout for writer, _ in jobs), "stores written together share one layout"
    pending = sorted(set().union(*(writer.pending for writer, _ in jobs)))
    if shards is not None:
        pending = sorted(set(pending) & set(shards))
    with contextlib.ExitStack() as stack, torch.inference_mode():
        background = [stack.enter_context(BackgroundWriter(writer)) for writer, _ in jobs]
        for index in pending:
            wanted = [(b, config) for b, (writer, config) in zip(background, jobs) if index in writer.pending]
            first, count = layout.shard_bounds(index)
            # Batches never straddle shards, so a resumed shard sees exactly the batches it would have.
            for lo in range(first, first + count, batch_size):
                hi = min(lo + batch_size, first + count)
                host_ids = input_ids[lo:hi]
                ids = torch.from_numpy(host_ids.astype(np.int64)).to(device, non_blocking=True)
                labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)  # the last position has none
                logits = model(input_ids=ids, use_cache=False).logits
                for writer_thread, config in wanted:
                    targets = extract(logits, labels, config, first_sequence=lo)
                    writer_thread.submit(index, lo, host_ids, for_storage(targets),
                                         -targets.label_logprobs.sum(dtype=torch.float64), int((labels >= 0).sum()))
                del logits
                if on_batch is not None:
                    on_batch(ids.numel())


def extract(logits: torch.Tensor, labels: torch.Tensor, config: CacheConfig, first_sequence: int):
    """The targets ``config`` asks for, of a batch whose first row is global sequence ``first_sequence``."""
    if config.targets == "sampled":
        seeds = [sequence_seed(config.seed, first_sequence + b) for b in range(logits.shape[0])]
        return sampled_targets(logits, config.samples, seeds, config.temperature, labels)
    if config.targets == "topp":
        return topp_targets(logits, config.k, config.top_p, config.temperature, labels)
    return extract_targets(logits, config.k, config.temperature, labels)


def for_storage(targets) -> dict:
    """Narrow on the device before the copy to the host: int32 ids and counts, float32 log-probs."""
    return {
        "ids": targets.ids.to(torch.int32),
        "values": targets.counts.to(torch.int32) if targets.counts is not None else targets.logprobs,
        "lengths": None if targets.lengths is None else targets.lengths.to(torch.int32),
    }


def store_header(config: CacheConfig, layout: Layout, encoding: Encoding, teacher: dict, tokenizer, vocab: int,
            corpus: dict) -> dict:
    """Every manifest section except the shard table; the identity sections decide resumes."""
    return {
        "storage": storage_section(config.format, layout, encoding),
        "layout": layout.to_dict(),
        "encoding": encoding.to_dict(),
        "targets": targets_section(config),
        "teacher": teacher,
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": vocab,
            "tokenizer_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "directory": "tokenizer",
        },
        "corpus": {**corpus, "text_column": None if config.data.startswith("builtin:") else config.text_column,
                   "split": config.split},
        "config": config.to_dict(),
    }


def targets_section(config: CacheConfig) -> dict:
    """What the targets mean: the manifest's ``targets`` section."""
    section = {"kind": config.targets, "temperature": config.temperature,
               "position": "entry i of a sequence is the teacher's distribution over the token after token i"}
    if config.targets == "sampled":
        return {**section, "samples": config.samples, "seed": config.seed,
                "values": "count / samples estimates the teacher's probability without bias; no tail",
                "tail": "none"}
    section.update({"k": config.k} if config.targets == "topk" else {"k": config.k, "top_p": config.top_p})
    return {**section, "values": "natural-log probabilities normalised over the full vocabulary",
            "tail": "bucket: 1 - sum(exp(target_logprobs)) is the teacher's probability mass outside the stored ids"}


def _log(config: CacheConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def _progress(config: CacheConfig, total: int, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="teacher", disable=disable or not config.progress,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
