"""Which teacher token is which student token: a map between two vocabularies, built once.

Two tokenizers agree on a token when it stands for the same bytes of text. A token's bytes are
read from how its tokenizer writes them, for the two families causal LMs use:

- byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen): each byte is one printable character of a fixed
  table (``bytes_to_unicode``); a token is the bytes its characters stand for (``Ġthe`` is `` the``);
- SentencePiece-style (Llama 2, Mistral, Gemma): ``▁`` is a space, ``<0xNN>`` byte-fallback tokens
  are the byte NN, anything else is its UTF-8 text.

The family is the tokenizer's decoder (``ByteLevel``, or a ``Metaspace``/``Replace ▁`` decoder).
Special tokens (BOS, EOS, padding, chat markers) stand for no text: they map to the other side's
special token of the same text (``<|im_end|>``), then of the same role (EOS to EOS), or not at all. A token whose bytes cannot be told (another
family) maps to nothing: its teacher mass goes to the tail bucket, so what is matched stays exact
(softcache.losses). The map is many-to-one at most when one vocabulary holds two tokens for the
same bytes (byte fallback and a plain one); the first id found keeps them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache

import numpy as np

UNMAPPED = -1
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_table() -> dict[str, int]:
    """byte-level BPE's character of each byte (GPT-2's bytes_to_unicode), inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters)}


def _family(tokenizer) -> str:
    """"bytelevel", "metaspace" or "unknown": how the tokenizer writes a token's bytes (its decoder)."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = [decoder] + list(decoder.get("decoders") or [])
    types = {step.get("type") for step in kinds}
    if "ByteLevel" in types:
        return "bytelevel"
    if "Metaspace" in types or any(step.get("type") == "Replace" and "▁" in json.dumps(step.get("pattern"), ensure_ascii=False)
                                   for step in kinds):
        return "metaspace"
    return "unknown"


def token_bytes(tokenizer) -> list[bytes | None]:
    """Per id (``len(tokenizer)`` of them), the bytes of text the token stands for; None for a special
    token, a token of an unknown family, or one whose characters are not its family's."""
    family = _family(tokenizer)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    table = _byte_table()
    out: list[bytes | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None or family == "unknown":
            out.append(None)
        elif family == "bytelevel":
            out.append(bytes(table[c] for c in token) if all(c in table for c in token) else None)
        else:
            fallback = _BYTE_FALLBACK.fullmatch(token)
            out.append(bytes([int(fallback.group(1), 16)]) if fallback else token.replace("▁", " ").encode())
    return out


@dataclass(frozen=True)
class VocabMap:
    """Teacher id -> student id (:data:`UNMAPPED` where none stands for the same bytes)."""

    student_of: np.ndarray
    """[teacher vocabulary] int64 student ids, :data:`UNMAPPED` where none."""
    teacher_size: int
    student_size: int

    @property
    def mapped(self) -> int:
        return int(np.count_nonzero(self.student_of != UNMAPPED))


def build_map(teacher_tokenizer, student_tokenizer, teacher: list | None = None, student: list | None = None) -> VocabMap:
    """The map between two tokenizers' vocabularies (see the module docstring); with the same tokenizer
    on both sides, every id maps to itself. ``teacher``, ``student``: their :func:`token_bytes`, when
    the caller has them already (a large vocabulary takes a fraction of a second each)."""
    teacher = token_bytes(teacher_tokenizer) if teacher is None else teacher
    student = token_bytes(student_tokenizer) if student is None else student
    index: dict[bytes, int] = {}
    for i, piece in enumerate(student):
        if piece is not None:
            index.setdefault(piece, i)
    student_of = np.full(len(teacher), UNMAPPED, dtype=np.int64)
    for i, piece in enumerate(teacher):
        if piece is not None and piece in index:
            student_of[i] = index[piece]
    specials = {token.content: i for i, token in student_tokenizer.added_tokens_decoder.items() if token.special}
    for i, token in teacher_tokenizer.added_tokens_decoder.items():  # a chat marker both know, by its text
        if token.special and token.content in specials:
            student_of[i] = specials[token.content]
    for role in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        t, s = getattr(teacher_tokenizer, role, None), getattr(student_tokenizer, role, None)
        if t is not None and s is not None:
            student_of[t] = s
    if _spelled(teacher_tokenizer) == _spelled(student_tokenizer):  # one vocabulary: special tokens too are themselves
        student_of = np.arange(len(teacher), dtype=np.int64)
    return VocabMap(student_of, len(teacher), len(student))


def _spelled(tokenizer) -> tuple:
    """Every token as its tokenizer writes it, with the family that says how: equal for one vocabulary."""
    return _family(tokenizer), tuple(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
