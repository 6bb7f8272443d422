"""Where a teacher's tokens and a student's tokens of the same text meet: the alignment a view holds.

A store holds the teacher's token ids; the teacher's tokenizer (kept in the store) says which bytes
of text each one stands for (softcache.vocab_map.token_bytes). The alignment of a sequence is the
same text tokenized by a student's tokenizer, and where the two tokenizations meet:

- ``ids``: the student's tokens. Each run of text between the teacher's special tokens is tokenized
  alone (as the student's tokenizer would a document); a special token becomes the student's special
  of the same text or role (EOS to EOS), or is dropped when the student has none. Bytes that are no
  UTF-8 text on their own (a character cut by the sequence's edge) are dropped.
- ``home``: the teacher token holding each student token's first byte (its document, its mask).
- ``teacher_pos``: where a student position is *aligned*, the teacher position whose target it takes;
  -1 elsewhere. Student position j is aligned with teacher position i when student token j and
  teacher token i end at the same byte and the next tokens on both sides start there: both predict
  the continuation of the same text from the same point, each over its own vocabulary.

Every student position trains on cross-entropy of its own next token; aligned ones add the cross-
tokenizer KD term (softcache.cross_losses). softcache.view keeps the alignment of every sequence of a
store in a side file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from softcache.errors import SoftcacheError
from softcache.vocab_map import UNMAPPED, build_map, token_bytes

SEQUENCES_PER_CALL = 64
"""Sequences whose texts go to the student's tokenizer in one batched call."""


@dataclass(frozen=True)
class Alignment:
    """One sequence in the student's tokens (see the module docstring); int32 arrays of equal length."""

    ids: np.ndarray
    home: np.ndarray
    teacher_pos: np.ndarray
    text_bytes: int
    """Bytes of text the sequence holds (those the student's tokens cover): the unit of bits per byte."""


class Aligner:
    """Aligns teacher sequences to a student tokenizer; built once per (teacher, student) pair."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        pieces = token_bytes(teacher_tokenizer)
        if all(p is None for p in pieces):
            raise SoftcacheError("the store's tokenizer is neither byte-level BPE nor SentencePiece-style: the text "
                                 "of its tokens cannot be read back, so no other tokenizer can be aligned to it")
        self.pieces = pieces
        self.lengths = np.array([0 if p is None else len(p) for p in pieces], dtype=np.int64)
        self.textless = np.array([p is None for p in pieces])
        self.student = student_tokenizer
        self.student_pieces = token_bytes(student_tokenizer)
        self.map = build_map(teacher_tokenizer, student_tokenizer, pieces, self.student_pieces)

    def align(self, sequences: list[np.ndarray]) -> list[Alignment]:
        """The alignment of each teacher sequence (int ids, any length)."""
        plans = [self._plan(np.asarray(ids, dtype=np.int64)) for ids in sequences]
        texts = [text for plan in plans for _, _, text in plan["parts"]]
        encoded = self.student(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
        out, at = [], 0
        for plan in plans:
            n = len(plan["parts"])
            tokens = [(encoded["input_ids"][at + p], encoded["offset_mapping"][at + p]) for p in range(n)]
            at += n
            out.append(self._assemble(plan, tokens))
        return out

    def _plan(self, ids: np.ndarray) -> dict:
        """Byte spans of the teacher's tokens and the UTF-8 texts of its runs between special tokens."""
        lengths = self.lengths[np.clip(ids, 0, len(self.lengths) - 1)] * (ids < len(self.lengths))
        textless = np.where(ids < len(self.textless), self.textless[np.clip(ids, 0, len(self.textless) - 1)], True)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        parts = []  # (teacher index of the run's first token, byte offset, text) in order
        boundaries = np.flatnonzero(textless)
        edges = np.concatenate([[-1], boundaries, [len(ids)]])
        for left, right in zip(edges[:-1], edges[1:]):
            first, stop = left + 1, right
            if first >= stop:
                continue
            data = b"".join(self.pieces[i] for i in ids[first:stop].tolist())
            for offset, text in _utf8_parts(data, int(starts[first])):
                parts.append((first, offset, text))
        return {"ids": ids, "starts": starts, "ends": ends, "textless": textless, "parts": parts,
                "text": lengths > 0}

    def _assemble(self, plan: dict, tokens: list) -> Alignment:
        ids, starts, ends, textless = plan["ids"], plan["starts"], plan["ends"], plan["textless"]
        with_text = np.flatnonzero(plan["text"])
        text_ends = ends[with_text]
        chunks = []  # (teacher index where the chunk sits, student ids, byte starts, byte ends, end index)
        for (first, offset, text), (student_ids, spans) in zip(plan["parts"], tokens):
            s_start, s_end = self._spans(text, student_ids, spans)
            s_start, s_end = offset + s_start, offset + s_end
            home = with_text[np.minimum(np.searchsorted(text_ends, s_start, side="right"), len(with_text) - 1)]
            at = np.minimum(np.searchsorted(text_ends, s_end, side="left"), len(with_text) - 1)
            ending = np.where((text_ends[at] == s_end) & (s_end > s_start), with_text[at], -1)
            chunks.append((first, np.asarray(student_ids, dtype=np.int64), s_start, home, ending))
        for i in np.flatnonzero(textless).tolist():
            student = int(self.map.student_of[ids[i]]) if ids[i] < len(self.map.student_of) else UNMAPPED
            if student != UNMAPPED:
                one = np.array([i], dtype=np.int64)
                chunks.append((i, np.array([student], dtype=np.int64), starts[one], one, one))
        chunks.sort(key=lambda chunk: chunk[0])
        if not chunks:
            empty = np.zeros(0, dtype=np.int32)
            return Alignment(empty, empty, empty, 0)
        student_ids, s_start, home, ending = (np.concatenate([c[k] for c in chunks]) for k in range(1, 5))
        teacher_pos = np.full(len(student_ids), -1, dtype=np.int64)
        follows = ending[:-1] + 1
        inside = (ending[:-1] >= 0) & (follows < len(ids))
        nxt = np.minimum(follows, len(ids) - 1)
        meets = inside & (home[1:] == nxt) & (s_start[1:] == starts[nxt])
        teacher_pos[:-1] = np.where(meets, ending[:-1], -1)
        if ending[-1] == len(ids) - 1:  # both end on the sequence's last token: the same last target
            teacher_pos[-1] = ending[-1]
        covered = int(sum(len(text.encode()) for _, _, text in plan["parts"]))
        return Alignment(student_ids.astype(np.int32), home.astype(np.int32), teacher_pos.astype(np.int32), covered)


    def _spans(self, text: str, student_ids: list[int], offsets: list) -> tuple[np.ndarray, np.ndarray]:
        """Byte start and end of each student token in ``text``: from the tokens' own bytes where they
        spell the text exactly, else from the tokenizer's character offsets (a tokenizer that adds a
        space or normalises the text). Two tokens of one character's bytes then both span the whole
        character, and only the last is taken to end there."""
        pieces = [self.student_pieces[i] if i < len(self.student_pieces) else None for i in student_ids]
        if None not in pieces and b"".join(pieces) == text.encode("utf-8"):
            ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
            return ends - [len(p) for p in pieces], ends
        widths = _char_bytes(text)
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = widths[spans[:, 0]], widths[spans[:, 1]]
        shared = np.zeros(len(ends), dtype=bool)
        shared[:-1] = ends[:-1] == ends[1:]
        return starts, np.where(shared, starts, ends)  # no longer than zero: it ends nowhere


def _utf8_parts(data: bytes, offset: int):
    """(byte offset, text) of each maximal run of ``data`` that is valid UTF-8; the bytes between are skipped."""
    while data:
        try:
            yield offset, data.decode("utf-8")
            return
        except UnicodeDecodeError as err:
            if err.start:
                yield offset, data[: err.start].decode("utf-8")
            data, offset = data[err.end :], offset + err.end


def _char_bytes(text: str) -> np.ndarray:
    """[len(text) + 1] byte offset of each character boundary of ``text`` in its UTF-8 encoding."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
