"""Rewriting a store in another format with identical content.

The shard layout, targets and metadata are kept; only the storage section changes, and the id code
where it moves between the two that code the same columns in memory (delta and ranked). The content
digest (computed from the columns, independent of format and codec) must come out equal for every
shard as it is written: a shard that differs stops the conversion before DEST is marked complete.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from softcache.errors import StoreError
from softcache.store.consistency import store_content_digest
from softcache.store.encoding import SORTED_IDS, Ragged
from softcache.store.files import content_sha256
from softcache.store.reader import open_store
from softcache.store.registry import storage_section
from softcache.store.writer import StoreWriter, derived_header


def convert_store(source: str | Path, dest: str | Path, format_name: str, on_shard=None, codec: dict | None = None,
                  ids: str | None = None) -> dict:
    """Write the complete store ``source`` to ``dest`` in ``format_name``; return the new manifest.

    ``codec`` picks the new store's compression (the format's default when None), ``ids`` its id code
    (the source's when None; delta and ranked convert into each other).
    Resumable like a teacher job: rerunning after an interruption continues after the last shard.
    """
    store = open_store(source)
    encoding = store.encoding
    if ids is not None and ids != encoding.ids:
        if encoding.ids not in SORTED_IDS or ids not in SORTED_IDS:
            raise StoreError(f"--ids {ids}: a conversion keeps the content, so it changes the id code only between "
                             f"{' and '.join(SORTED_IDS)}; {source} codes its ids as {encoding.ids}")
        encoding = dataclasses.replace(encoding, ids=ids)
    header = derived_header(
        store.manifest,
        encoding=encoding.to_dict(),
        storage=storage_section(format_name, store.layout, encoding, codec),
        converted_from={"storage": store.manifest["storage"], "content_sha256": store.manifest["totals"]["content_sha256"]},
    )
    with StoreWriter.open(dest, header, out_flag="DEST") as writer:  # a conversion that stops early frees DEST
        if writer.complete:
            return writer.header
        if store.tokenizer_path.is_dir():
            writer.save_tokenizer(lambda directory: shutil.copytree(store.tokenizer_path, directory))
        for index in writer.pending:
            columns = {name: Ragged(*map(np.ascontiguousarray, value)) if isinstance(value, Ragged)
                       else np.ascontiguousarray(value) for name, value in store.shard_columns(index).items()}
            writer.write_shard(index, columns, teacher_nll=store.shards[index].teacher_nll)
            written = writer.format.reader(writer.root, writer.layout, writer.encoding, 1).load(index)
            if content_sha256(written) != store.shards[index].content_sha256:  # read back, as a reader will
                raise StoreError(f"converting {source} to {dest} changed the content of shard {index}; DEST is "
                                 "left incomplete (the new store would not be equivalent)")
            if on_shard is not None:
                on_shard(index)
        if store_content_digest([writer.done[i] for i in sorted(writer.done)]) != store.totals.content_sha256:
            raise StoreError(f"converting {source} to {dest} changed the content digest; DEST is left incomplete")
        return writer.finish()
