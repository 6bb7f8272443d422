"""Several corpora mixed with weights: ``--data a --data b --weights 0.7,0.3``.

The mix is of documents, interleaved so that each source's share of the tokens read follows its
weight: the next document comes from the source furthest behind its share (the least tokens read
divided by its weight; the first source on a tie). Tokens, not documents, because sources differ in
document length by orders of magnitude (a chat turn against a web page) and a token share is what a
data mix means. No random draw is involved, so the order is a function of the inputs alone, the
same on every run and every rank, and any point of it can be reached again from its state: per
source, the place of the last document read from it (read again and passed over on a restart, so
any source's places serve, streamed ones included), the tokens and documents read so far and the
passes completed (:data:`SourceState`). That state is the place of a mixed document (softcache.packers.Place), so
the streamed corpus's cursors (softcache.corpus_stream) resume a mix as they resume one corpus.

When a source runs out (``--mix-stop``): ``first_exhausted`` ends the mix there, so every source
keeps its share and none is read twice; ``all_exhausted`` starts that source again from its first
row (a second pass: its documents repeat) until every source has been read through once, so no
document is left out and the smaller sources are oversampled. The names are datasets'
(``interleave_datasets``), whose mix is by example and random.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from softcache.corpus import CorpusRows
from softcache.errors import SoftcacheError
from softcache.packers import Place

MIX_STOPS = {
    "first_exhausted": "end the mix when a source runs out: shares kept, nothing repeated",
    "all_exhausted": "read a source that runs out again from its start, until every source has run out once",
}
SourceState = tuple[Place | None, int, int, int]
"""One source's place in a mix: the place of the last document read from it in this pass (None: none
yet), tokens and documents read, passes completed."""


class Mixture:
    """Corpora of one input shape, mixed by token share (see the module docstring)."""

    def __init__(self, sources: list[CorpusRows], weights: list[float], stop: str):
        assert len(sources) == len(weights) > 1 and stop in MIX_STOPS
        self.sources, self.stop = sources, stop
        largest = max(weights)  # scaled first, so that weights near the float limit do not sum to inf
        total = sum(weight / largest for weight in weights)
        self.weights = [weight / largest / total for weight in weights]
        self.source = " + ".join(rows.source for rows in sources)
        for rows in sources:
            if rows.total() == 0:  # its shape would be a guess: say what it holds
                raise SoftcacheError(f"--data {rows.source} holds no rows to mix")
        self.shape = sources[0].shape
        for rows in sources[1:]:
            if rows.shape != self.shape:
                raise SoftcacheError(f"--data {rows.source} holds {rows.shape} rows but --data {sources[0].source} "
                                     f"holds {self.shape} rows; the corpora of a mix must hold rows of one input shape")

    @property
    def parts(self) -> list:
        """Every source's parts, in order (what decides the rows: their stamps)."""
        return [part for rows in self.sources for part in rows.parts]

    def start(self) -> tuple[SourceState, ...]:
        return tuple((None, 0, 0, 0) for _ in self.sources)

    def choose(self, state: tuple[SourceState, ...]) -> int:
        """The source the next document comes from: the one furthest behind its token share."""
        return min(range(len(state)), key=lambda i: (state[i][1] / self.weights[i], i))

    def documents(self, open_source: Callable[[CorpusRows, Place | None], Iterator[tuple[Place, object]]],
                  start: tuple[SourceState, ...] | None = None) -> Iterator[tuple[tuple[SourceState, ...], object]]:
        """The mixed documents from ``start`` (the place a document was given with) on, each with its place:
        the state before it was read. ``open_source(rows, place)`` reads one source's documents (each
        with its place and ``.ids``) from the one at ``place`` on (None: from the first)."""
        state = [list(source) for source in (start or self.start())]
        reading: dict[int, Iterator] = {}
        while True:
            i = self.choose(tuple(map(tuple, state)))
            if i not in reading:
                reading[i] = open_source(self.sources[i], state[i][0])
                if state[i][0] is not None:
                    next(reading[i], None)  # the document last read there, read again to get past it
            item = next(reading[i], None)
            if item is None:  # source i has run out
                if self.stop == "first_exhausted" or all(state[j][3] for j in range(len(state)) if j != i):
                    return
                state[i] = [None, state[i][1], state[i][2], state[i][3] + 1]
                reading[i] = open_source(self.sources[i], None)
                item = next(reading[i], None)
                if item is None:
                    return
            before = tuple(map(tuple, state))
            place, document = item
            tokens, documents, passes = state[i][1:]
            state[i] = [place, tokens + len(document.ids), documents + 1, passes]
            yield before, document

    def tally(self, last: tuple[SourceState, ...], tokens: int) -> list[dict]:
        """Per source, what the mix read up to and including the document at place ``last`` (of ``tokens``
        tokens): its documents, tokens, their share of all tokens, and how often it was started again."""
        chosen = self.choose(last)
        read = [(s[1] + (tokens if i == chosen else 0), s[2] + (i == chosen), s[3]) for i, s in enumerate(last)]
        total = sum(tokens for tokens, _, _ in read) or 1
        return [{"data": rows.source, "weight": round(weight, 6), "documents": documents, "tokens": tokens,
                 "share": round(tokens / total, 6), "restarts": passes}
                for rows, weight, (tokens, documents, passes) in zip(self.sources, self.weights, read)]


def parse_weights(weights: str | None, count: int) -> list[float] | None:
    """``--weights 0.7,0.3`` as ``count`` positive finite numbers (any scale: they are normalised); None
    for none given. Raises :class:`SoftcacheError` naming the flag."""
    if weights is None:
        return None
    try:
        values = [float(value) for value in weights.split(",")]
    except ValueError:
        raise SoftcacheError(f"--weights {weights}: give one number per --data, separated by commas, "
                             "e.g. --weights 0.7,0.3") from None
    if len(values) != count:
        raise SoftcacheError(f"--weights {weights} gives {len(values)} weights for {count} --data corpora; give one "
                             "per --data, in the same order")
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise SoftcacheError(f"--weights {weights}: every weight must be a positive finite number")
    return values

