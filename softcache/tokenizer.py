"""Tokenizer identity: what makes two tokenizers the same, for stores and students alike."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a fast tokenizer's full definition (vocab, merges, normaliser, special tokens)."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    blob = json.dumps(definition, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()
