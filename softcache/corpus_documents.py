"""A corpus's rows as packed documents: tokenize text rows or render chat rows, mark the positions
that teach, refuse or skip bad rows, then pack (softcache.documents).

The settings that decide this (``--train-on``, ``--packing``, ``--long``) may be ``auto``;
:class:`Recipe` resolves them from the input shape, once. Chat rows default to ``--packing
documents`` (each conversation alone in attention, so a target is the teacher's answer to that
conversation only, with little padding) and ``--long truncate`` (a conversation's start is the
context of its replies; a later piece alone would be replies to nothing). Text keeps ``--packing
stream`` (every store written before chat rows used it) and, for the other packings, ``--long
split`` (a piece of text is still text). Rendering is per row in Python: the chat template runs
twice per teaching assistant turn, plus once (see softcache.chat), while text is tokenized in
batches. Measured with SmolLM2's tokenizer and template on a 2-core CPU: 1,600 conversations
(170k tokens) a second, so a progress bar shows once rendering takes more than a moment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from softcache.chat import InputShape, TrainOn, chat_template_of, render, teaching_positions
from softcache.corpus import CorpusRows
from softcache.documents import (LONG, PACKINGS, TOKENIZE_BATCH, Document, PackedCorpus, no_text, pack, pack_documents,
                                 text_eos, tokenized_texts)
from softcache.errors import BadRow, SoftcacheError
from softcache.mixture import Mixture
from softcache.packers import Place

AUTO = "auto"
_PROGRESS_AFTER_S = 2.0  # a progress bar appears once rendering has taken this long


@dataclass(frozen=True)
class Recipe:
    """How rows of one input shape become packed rows: the resolved ``--train-on``, ``--packing`` and ``--long``."""

    shape: InputShape
    train_on: TrainOn
    packing: str
    long: str

    @classmethod
    def resolve(cls, shape: InputShape, train_on: str = AUTO, packing: str = AUTO, long: str = AUTO,
                source: str = "", chat_template: bool = False) -> Recipe:
        """``auto`` values filled in from ``shape`` (see the module docstring); raises :class:`SoftcacheError`
        naming the flag for a combination that cannot work. ``chat_template``: whether one was given."""
        text = shape == InputShape.TEXT
        holds = f"--data {source} holds text rows" if source else "the corpus holds text rows"
        if train_on == AUTO:
            train_on = {InputShape.MESSAGES: TrainOn.ASSISTANT, InputShape.PROMPT_COMPLETION: TrainOn.COMPLETION,
                        InputShape.TEXT: TrainOn.ALL}[shape]
        if text and train_on != TrainOn.ALL:
            raise SoftcacheError(f"--train-on {train_on} needs chat rows (messages or prompt_completion); {holds}, "
                                 "in which every position teaches (--train-on all)")
        if text and chat_template:
            raise SoftcacheError(f"--chat-template renders messages and prompt_completion rows; {holds}")
        if packing == AUTO:
            packing = "stream" if text else "documents"
        if packing == "stream" and not text:
            raise SoftcacheError(f"--packing stream joins text documents into one stream; {shape} rows are packed "
                                 "whole: use --packing documents or none")
        if long == AUTO:
            long = "split" if text else "truncate"
        if packing == "stream" and long != "split":
            raise SoftcacheError(f"--long {long} needs whole documents (--packing documents or none); --packing "
                                 "stream cuts every document at row edges")
        if packing not in PACKINGS or long not in LONG:
            raise ValueError(f"unknown packing {packing!r} or long {long!r}")
        return cls(shape, TrainOn(train_on), packing, long)


def pack_rows(rows: CorpusRows, tokenizer, seq_len: int, *, max_sequences: int | None = None,
              train_on: str = AUTO, packing: str = AUTO, long: str = AUTO, chat_template: str | None = None,
              skip_bad_rows: bool = False, progress: bool = False) -> PackedCorpus:
    """``rows`` tokenized (text) or rendered with ``tokenizer`` (chat; ``chat_template``, the text of
    ``--chat-template``, overrides its template) and packed into ``seq_len``-token rows, in memory
    (the teacher job streams instead: softcache.corpus_stream).

    A :class:`BadRow` is one :class:`SoftcacheError` naming the file and the row, or with
    ``skip_bad_rows`` skipped and counted (``bad_rows``). ``progress`` shows a bar on stderr while
    chat rows are rendered, once that takes a while.
    """
    recipe = Recipe.resolve(rows.shape, train_on, packing, long, rows.source, chat_template is not None)
    if recipe.packing == "stream":
        corpus = pack((text for _, _, text in rows), tokenizer, seq_len, max_sequences, source=rows.source)
        return dataclasses.replace(corpus, rows_read=corpus.documents + corpus.empty_documents)
    counts = RowCounts()
    documents = (document for _, document in
                 positioned_documents(rows, tokenizer, recipe, chat_template, skip_bad_rows, counts, progress))
    corpus = pack_documents(documents, seq_len, recipe.packing, recipe.long, pad_id(tokenizer), max_sequences,
                            rows.source)
    return dataclasses.replace(corpus, **counts.of(rows.shape, recipe, tokenizer, chat_template))


def pad_id(tokenizer) -> int:
    """What rows of whole documents are padded with: the tokenizer's pad token, else its EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SoftcacheError("the teacher's tokenizer has neither a pad nor an EOS token to pad rows with")
    return pad


def positioned_documents(rows: CorpusRows | Mixture, tokenizer, recipe: Recipe, chat_template: str | None,
                         skip_bad_rows: bool, counts: RowCounts, progress: bool = False, start: Place | None = None,
                         batch: int = TOKENIZE_BATCH) -> Iterator[tuple[Place, Document]]:
    """Each usable row from the place ``start`` on (the first row when None) as a document with its
    place (softcache.packers.Place): text tokenized ``batch`` rows at a time, chat rows rendered (bad
    ones refused or skipped, see :func:`pack_rows`); a mix's sources read and interleaved as
    softcache.mixture says."""
    if isinstance(rows, Mixture):
        return rows.documents(lambda source, at: positioned_documents(
            source, tokenizer, recipe, chat_template, skip_bad_rows, counts, False, at, batch), start)
    if recipe.shape == InputShape.TEXT:
        return _text_documents(rows, tokenizer, counts, start, batch)
    return _chat_documents(rows, tokenizer, recipe, chat_template, skip_bad_rows, counts, progress, start)


@dataclass
class RowCounts:
    """What reading rows found: rows read, empty ones, bad ones and the first of them."""

    rows: int = 0
    empty: int = 0
    bad: int = 0
    first_bad: str = ""

    def of(self, shape: InputShape, recipe: Recipe, tokenizer, chat_template: str | None) -> dict:
        """The corpus counts these rows add to the packing's (softcache.documents.Counts fields)."""
        template = None if shape == InputShape.TEXT else chat_template_of(tokenizer, chat_template)
        return {"input_shape": str(shape), "train_on": str(recipe.train_on), "rows_read": self.rows,
                "bad_rows": self.bad, "first_bad_row": self.first_bad or None, "empty_documents": self.empty,
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None}


def _text_documents(rows: CorpusRows, tokenizer, counts: RowCounts, start: Place | None,
                    batch: int) -> Iterator[tuple[Place, Document]]:
    """Each text row with text as a document: its tokens (no special tokens) and EOS, tokenized in
    batches that grow from a few rows to ``batch`` (a replayed shard reads only a little past its end)."""
    eos = text_eos(tokenizer)
    rows_before, empty_before = counts.rows, counts.empty  # counts may be shared with a mix's other sources

    def read() -> Iterator[tuple[Place, str]]:
        for place, _, _, text in rows.positioned(start):
            counts.rows += 1
            yield place, text

    def empty() -> None:
        counts.empty += 1

    for encoded in tokenized_texts(read(), tokenizer, empty, first=min(16, batch), most=batch):
        yield from ((place, Document.text(ids, eos)) for place, ids in encoded)
    skipped = counts.empty - empty_before
    if counts.rows - rows_before == skipped and start is None:
        raise SoftcacheError(f"--data {rows.source} has no text to cache: {no_text(skipped)}")


def _chat_documents(rows: CorpusRows, tokenizer, recipe: Recipe, chat_template: str | None, skip_bad_rows: bool,
                    counts: RowCounts, progress: bool, start: Place | None
                    ) -> Iterator[tuple[Place, Document]]:
    """Each chat row rendered, with the positions whose next token is a target teaching."""
    from tqdm.auto import tqdm

    yielded = False
    rows_before, bad_before = counts.rows, counts.bad  # counts may be shared with a mix's other sources
    first_bad = ""  # of these rows
    with tqdm(total=rows.total(), unit="row", desc="rendering", disable=not progress, delay=_PROGRESS_AFTER_S,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for place, where, index, row in rows.positioned(start):
            counts.rows += 1
            bar.update()
            try:
                rendered = render(tokenizer, row, recipe.shape, index=index, chat_template=chat_template,
                                  train_on=recipe.train_on)
            except BadRow as err:
                if not skip_bad_rows:
                    raise SoftcacheError(f"--data {where}: {err} (rows count from 0; --skip-bad-rows skips such "
                                         "rows)") from err
                first_bad = first_bad or f"--data {where}: {err}"
                counts.bad += 1
                counts.first_bad = counts.first_bad or first_bad
                continue
            yielded = True
            yield place, Document(rendered.input_ids, teaching_positions(rendered.assistant))
    if not yielded and start is None:
        found = (f"all {counts.rows - rows_before:,} of its rows are bad and were skipped (the first: {first_bad})"
                 if counts.bad > bad_before else "it holds no rows")
        raise SoftcacheError(f"--data {rows.source} has no rows to cache: {found}")
