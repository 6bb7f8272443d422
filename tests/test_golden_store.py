"""The bytes of a fixed small teacher job do not change by accident.

tests/data/golden_stores.json holds, for one small job per target kind and format, the sha256 of
every shard file, the content digest and the sha256 of the manifest (with this machine's paths
replaced by placeholders), once per CPU whose arithmetic gave other bytes. A refactor must leave
all of them equal on some recorded machine; a deliberate change of the store format records the file
afresh (``SOFTCACHE_WRITE_GOLDEN=fresh pytest tests/test_golden_store.py``, dropping every machine's
record) and says so in its commit, and ``SOFTCACHE_WRITE_GOLDEN=1`` adds (or replaces) this
machine's record beside the others.

The tiny teacher's logits come from a CPU forward pass, whose last bits may differ between torch
builds; the digests are checked under the torch version they were recorded with (the one
tools/setup.sh installs, which CI uses) and the test says it did not compare under another. Under
one torch build they may still differ between CPUs (vector widths change the matrix products'
summation order): too little to move a stored code, enough to move the last digits of the teacher's
cross-entropy that the manifest records. That one number is compared to 1e-6 relative instead of
by the manifest's digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path

import pytest
import torch

from softcache.cache_job import run_cache
from softcache.store.manifest import MANIFEST_SEAL, seal_problem

from conftest import store_files

GOLDEN = Path(__file__).parent / "data" / "golden_stores.json"
JOBS = {
    "topk-zarr": {"ids": "delta"},  # the tests' cache_config: top-8
    "topk-arrow-plain-float16": {"format": "arrow", "ids": "plain", "values": "float16", "temperature": 0.7},
    "topp-zarr-bitpack": {"targets": "topp", "top_p": 0.8, "ids": "bitpack"},
    "sampled-zarr": {"targets": "sampled", "samples": 12, "seed": 3, "draws": "independent", "ids": "delta"},
    "sampled-arrow-plain": {"format": "arrow", "targets": "sampled", "samples": 7, "ids": "plain",
                            "draws": "independent"},
    "sampled-zarr-systematic": {"targets": "sampled", "samples": 12, "seed": 3, "ids": "delta"},
    "sampled-zarr-ranked": {"targets": "sampled", "samples": 12, "seed": 3},  # the default id code
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
    return re.sub(r'"teacher_ce": [^,\n}]+', '"teacher_ce": "<teacher_ce>"', text)


def _digests(cache_config, tiny_teacher, corpus_file, tmp_path) -> dict:
    results = {}
    for name, overrides in JOBS.items():
        out = tmp_path / name
        run_cache(cache_config(out=str(out), **overrides))
        placeholders = {str(out): "<out>", str(tiny_teacher): "<teacher>", str(corpus_file): "<corpus>"}
        manifest = _normalised_manifest(out, placeholders)
        results[name] = {
            "teacher_ce": json.loads((out / "manifest.json").read_text())["totals"]["teacher_ce"],
            "files": {path: hashlib.sha256(data).hexdigest() for path, data in store_files(out).items()},
            "content_sha256": json.loads(manifest)["totals"]["content_sha256"],
            "manifest_sha256": hashlib.sha256(manifest.replace(f'"softcache_version": "{_version()}"',
                                                               '"softcache_version": "<version>"').encode()).hexdigest(),
        }
    return results


def _version() -> str:
    from softcache import __version__

    return __version__


def _cpu() -> str:
    """What names this machine's arithmetic: the CPU model and the vector extension torch dispatches to."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def _problems(got: dict, recorded: dict) -> list[str]:
    """How this run's digests differ from one machine's record (nothing where it was not recorded)."""
    problems = []
    for name, want in recorded.items():
        have = got[name]
        if have["files"] != want["files"]:
            problems.append(f"{name}: shard file bytes changed")
        elif have["content_sha256"] != want["content_sha256"]:
            problems.append(f"{name}: content digest changed")
        elif "manifest_sha256" in want and have["manifest_sha256"] != want["manifest_sha256"]:
            problems.append(f"{name}: manifest bytes changed")
        elif "teacher_ce" in want and have["teacher_ce"] != pytest.approx(want["teacher_ce"], rel=1e-6):
            problems.append(f"{name}: teacher CE changed")
    return problems


def test_fixed_jobs_write_the_recorded_bytes(cache_config, tiny_teacher, corpus_file, tmp_path):
    """The jobs' digests equal those recorded on one of the machines the file lists (under this torch):
    every CPU whose arithmetic differs gets its own record, and a change of format breaks them all."""
    digests = _digests(cache_config, tiny_teacher, corpus_file, tmp_path)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"torch": None, "machines": []}
    if os.environ.get("SOFTCACHE_WRITE_GOLDEN"):
        keep = golden["torch"] == torch.__version__ and os.environ["SOFTCACHE_WRITE_GOLDEN"] != "fresh"
        others = [m for m in golden["machines"] if m["cpu"] != _cpu()] if keep else []
        GOLDEN.parent.mkdir(exist_ok=True)
        golden = {"torch": torch.__version__, "machines": [*others, {"cpu": _cpu(), "jobs": digests}]}
        GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")
    if golden["torch"] != torch.__version__:
        pytest.skip(f"digests recorded under torch {golden['torch']}, this is {torch.__version__}: not compared")
    found = [_problems(digests, machine["jobs"]) for machine in golden["machines"]]
    closest = min(found, key=len)
    assert not closest, (f"no recorded machine's digests match ({_cpu()}); closest: {'; '.join(closest)}. A "
                         "deliberate format change re-records the file; a new CPU adds its record "
                         "(SOFTCACHE_WRITE_GOLDEN=1)")
