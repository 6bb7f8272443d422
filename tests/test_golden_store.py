"""The bytes of a fixed small teacher job do not change by accident.

tests/data/golden_stores.json holds, for one small job per target kind and format, the sha256 of
every shard file, the content digest and the sha256 of the manifest (with this machine's paths
replaced by placeholders). A refactor must leave all of them equal; a deliberate change of the
store format regenerates the file (``SOFTCACHE_WRITE_GOLDEN=1 pytest tests/test_golden_store.py``)
and says so in its commit.

The tiny teacher's logits come from a CPU forward pass, whose last bits may differ between torch
builds; the digests are checked under the torch version they were recorded with (the one
tools/setup.sh installs, which CI uses) and the test says it did not compare under another.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from softcache.cache_job import run_cache
from softcache.store.manifest import MANIFEST_SEAL, seal_problem

from conftest import store_files

GOLDEN = Path(__file__).parent / "data" / "golden_stores.json"
JOBS = {
    "topk-zarr": {},  # the tests' cache_config: top-8
    "topk-arrow-plain-float16": {"format": "arrow", "ids": "plain", "values": "float16", "temperature": 0.7},
    "topp-zarr-bitpack": {"targets": "topp", "top_p": 0.8, "ids": "bitpack"},
    "sampled-zarr": {"targets": "sampled", "samples": 12, "seed": 3, "draws": "independent"},
    "sampled-arrow-plain": {"format": "arrow", "targets": "sampled", "samples": 7, "ids": "plain",
                            "draws": "independent"},
    "sampled-zarr-systematic": {"targets": "sampled", "samples": 12, "seed": 3},
}


def _normalised_manifest(root: Path, placeholders: dict[str, str]) -> str:
    """The manifest's text with this machine's paths as placeholders, and its seal (which covers those
    paths) checked and replaced by one."""
    text = (root / "manifest.json").read_text()
    seal = json.loads(text)[MANIFEST_SEAL]
    assert seal_problem(json.loads(text), MANIFEST_SEAL) is None
    text = text.replace(seal, "<seal>")
    for path, name in placeholders.items():
        text = text.replace(json.dumps(path)[1:-1], name)
    return text


def _digests(cache_config, tiny_teacher, corpus_file, tmp_path) -> dict:
    results = {}
    for name, overrides in JOBS.items():
        out = tmp_path / name
        run_cache(cache_config(out=str(out), **overrides))
        placeholders = {str(out): "<out>", str(tiny_teacher): "<teacher>", str(corpus_file): "<corpus>"}
        manifest = _normalised_manifest(out, placeholders)
        results[name] = {
            "files": {path: hashlib.sha256(data).hexdigest() for path, data in store_files(out).items()},
            "content_sha256": json.loads(manifest)["totals"]["content_sha256"],
            "manifest_sha256": hashlib.sha256(manifest.replace(f'"softcache_version": "{_version()}"',
                                                               '"softcache_version": "<version>"').encode()).hexdigest(),
        }
    return results


def _version() -> str:
    from softcache import __version__

    return __version__


def test_fixed_jobs_write_the_recorded_bytes(cache_config, tiny_teacher, corpus_file, tmp_path):
    digests = _digests(cache_config, tiny_teacher, corpus_file, tmp_path)
    if os.environ.get("SOFTCACHE_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "jobs": digests}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"digests recorded under torch {golden['torch']}, this is {torch.__version__}: not compared")
    for name, want in golden["jobs"].items():
        got = digests[name]
        assert got["files"] == want["files"], f"{name}: shard file bytes changed"
        assert got["content_sha256"] == want["content_sha256"], f"{name}: content digest changed"
        assert got["manifest_sha256"] == want["manifest_sha256"], f"{name}: manifest bytes changed"
