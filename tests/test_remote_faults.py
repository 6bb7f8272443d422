"""Stores at URLs as object stores behave at scale: requests that fail or stall, a reader that must not
wait on them, a mirror smaller than the store, several readers sharing one mirror.

The store lives in :class:`FlakyFileSystem`, fsspec's in-memory filesystem under ``flaky://`` with
faults injected on purpose and every request logged, so the tests observe what went over the wire.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from softcache import StoreError, open_store
from softcache.data import StoreDataset, epoch_order, rank_batch, shard_spans
from softcache.store.files import TMP_MARK
from softcache.store.mirror import Mirror
from softcache.store.remote import FileVanished
from softcache.store.transfer import RemoteSettings, size_limit
from softcache.store.zarr_format import ZarrReader
from softcache.errors import SoftcacheError

from test_store import make, write_store


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory object store that fails and stalls on purpose: the next ``failures[name]`` opens of
    a file whose path ends with ``name`` raise ConnectionError, the next opens sleep the seconds in
    ``stalls[name]`` first, and every request waits ``latency`` seconds. ``log`` holds (monotonic
    time, "get" or "put", path) of every open of a file."""

    protocol = "flaky"
    store: dict = {}
    pseudo_dirs = [""]
    failures: dict[str, int] = {}
    stalls: dict[str, list[float]] = {}
    latency = 0.0
    log: list[tuple[float, str, str]] = []
    on_get = None
    _guard = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.failures, cls.stalls, cls.latency, cls.log, cls.on_get = {}, {}, 0.0, [], None

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path).removeprefix("flaky://").strip("/")
        return "/" + path if path else ""

    def _fault(self, path: str) -> None:
        time.sleep(self.latency)
        with self._guard:
            name = next((n for n in self.failures if path.endswith(n) and self.failures[n] > 0), None)
            if name:
                self.failures[name] -= 1
            stall = next((s for n, s in self.stalls.items() if path.endswith(n) and s), None)
            pause = stall.pop(0) if stall else 0.0
        time.sleep(pause)
        if name:
            raise ConnectionError(f"connection reset while reading {path}")

    def info(self, path, **kwargs):
        time.sleep(self.latency)
        return super().info(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        time.sleep(self.latency)
        return super().ls(path, detail=detail, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        reading = "r" in mode
        self.log.append((time.monotonic(), "get" if reading else "put", path))
        if reading and FlakyFileSystem.on_get is not None:
            FlakyFileSystem.on_get(path)
        self._fault(path)
        if reading and path in self.store:  # a copy of its own: downloads in several threads do not share a position
            return MemoryFile(None, path, self.store[path].getvalue())
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture(autouse=True)
def flaky(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SOFTCACHE_RETRY_WAIT", "0")
    FlakyFileSystem.reset()
    yield FlakyFileSystem
    FlakyFileSystem.reset()


def publish(root: Path, url: str) -> None:
    """Put a local store's files at ``flaky://`` ``url``, as an upload to an object store would."""
    fs = fsspec.filesystem("flaky")
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "writer.lock":
            fs.pipe_file(f"{url}/{path.relative_to(root).as_posix()}", path.read_bytes())


def gets(name: str) -> list[float]:
    """Times of the requests that read a file whose path ends with ``name``."""
    return [t for t, kind, path in FlakyFileSystem.log if kind == "get" and path.endswith(name)]


def mirror_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


@pytest.fixture
def synthetic(tmp_path):
    """A 12-shard arrow store (4 sequences each) written locally and published at flaky://bucket/store."""
    layout, encoding = make(48, 4, 3, 4)
    write_store(tmp_path / "local", "arrow", layout, encoding)
    publish(tmp_path / "local", "flaky://bucket/store")
    return tmp_path / "local", "flaky://bucket/store"


# ---- retries, permanent failures, stalls --------------------------------------------------------

@pytest.fixture
def notes_logged():
    """The notes (INFO) and warnings the ``softcache`` logger gives while the test runs."""
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("softcache")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_transient_failures_are_retried_both_ways(synthetic, tmp_path, monkeypatch, notes_logged):
    local, url = synthetic
    monkeypatch.setenv("SOFTCACHE_ATTEMPTS", "3")
    FlakyFileSystem.failures = {"manifest.json": 1, "shard-00001.arrow": 2, "tokenizer.json": 2}
    store = open_store(url)
    for name, array in open_store(local).read(0, 48).items():
        np.testing.assert_array_equal(store.read(0, 48)[name], array)
    assert len(gets("shard-00001.arrow")) == 3 and len(gets("shard-00002.arrow")) == 1
    retried = [m for m in notes_logged if "shard-00001" in m]
    assert len(retried) == 2 and retried[1].startswith(
        "flaky://bucket/store: downloading shards/shard-00001.arrow failed (ConnectionError: connection reset while "
        "reading /bucket/store/shards/shard-00001.arrow); attempt 3 of 3 in 0.0 s")
    # uploads: a writer whose puts fail now and then still publishes the local bytes
    FlakyFileSystem.failures = {"shards/shard-00002.arrow": 2, "progress/shard-00000.json": 1, "manifest.json": 2}
    layout, encoding = make(12, 4, 3, 4)
    write_store(tmp_path / "again", "arrow", layout, encoding)
    write_store("flaky://bucket/written", "arrow", layout, encoding)
    fs = fsspec.filesystem("flaky")
    assert fs.cat_file("/bucket/written/shards/shard-00002.arrow") == (tmp_path / "again/shards/shard-00002.arrow").read_bytes()
    assert json.loads(fs.cat_file("/bucket/written/manifest.json"))["complete"]


def test_a_transfer_that_keeps_failing_is_one_line_naming_the_url_and_file(synthetic, tmp_path, monkeypatch):
    local, url = synthetic
    monkeypatch.setenv("SOFTCACHE_ATTEMPTS", "2")
    FlakyFileSystem.failures = {"shard-00001.arrow": 99}
    store = open_store(url)
    with pytest.raises(StoreError) as raised:
        store.read(0, 48)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(
        "flaky://bucket/store: downloading shards/shard-00001.arrow failed after 2 attempts (ConnectionError: "
        "connection reset while reading /bucket/store/shards/shard-00001.arrow); check the connection, or allow "
        "more with SOFTCACHE_ATTEMPTS and SOFTCACHE_TIMEOUT"), message
    assert len(gets("shard-00001.arrow")) == 2
    assert not [name for name in mirror_files(tmp_path) if "shard-00001" in name]  # nothing half-downloaded
    # an upload that keeps failing: one line, and the remote store is not marked complete
    FlakyFileSystem.failures = {"written/shards/shard-00001.arrow": 99}
    layout, encoding = make(12, 4, 3, 4)
    with pytest.raises(StoreError, match=r"^flaky://bucket/written: uploading shards/shard-00001.arrow failed "
                                         r"after 2 attempts \(ConnectionError"):
        write_store("flaky://bucket/written", "arrow", layout, encoding)
    assert not json.loads(fsspec.filesystem("flaky").cat_file("/bucket/written/manifest.json"))["complete"]


def test_a_stalled_transfer_times_out_and_leaves_no_partial_file(synthetic, tmp_path, monkeypatch):
    local, url = synthetic
    monkeypatch.setenv("SOFTCACHE_ATTEMPTS", "2")
    monkeypatch.setenv("SOFTCACHE_TIMEOUT", "0.1")
    store = open_store(url)
    FlakyFileSystem.stalls = {"shard-00000.arrow": [0.5]}  # the first attempt stalls, the second answers
    np.testing.assert_array_equal(store.read(0, 4)["target_ids"], open_store(local).read(0, 4)["target_ids"])
    assert len(gets("shard-00000.arrow")) == 2
    FlakyFileSystem.stalls = {"shard-00001.arrow": [0.5, 0.5]}  # every attempt stalls
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"downloading shards/shard-00001.arrow failed after 2 attempts "
                                         r"\(TransferTimeout: no answer within 0.1 s \(SOFTCACHE_TIMEOUT\)\)"):
        store.read(4, 8)
    assert time.monotonic() - started < 0.45  # not waited out
    time.sleep(0.7)  # the stalled requests end; what they wrote is deleted, never renamed into place
    assert not [name for name in mirror_files(tmp_path) if TMP_MARK in name or "shard-00001" in name]


# ---- fetching ahead -----------------------------------------------------------------------------

def expected_spans(local: Path, batch_size: int, seed: int, window: int) -> list[tuple[int, int, int]]:
    """The shards a single reader of ``local`` reads in its first epoch, computed from the order alone."""
    sizes = [shard.count for shard in open_store(local).shards]
    order = epoch_order(sizes, seed, 0, window)
    ends = np.cumsum(sizes)
    return shard_spans(order, lambda rows: np.searchsorted(ends, rows, side="right"),
                       np.arange(len(order) // batch_size), 0, batch_size, 1, 0)


def read_timed(url: str, pause: float, **options) -> tuple[list[dict], list[float]]:
    """Every batch of one epoch, and when each was asked for, with ``pause`` seconds of "training"
    between batches."""
    dataset = StoreDataset(url, 4, seed=3, window=2, epochs=1, world_size=1, rank=0, **options)
    batches, asked = [], []
    stream = iter(dataset)
    while True:
        asked.append(time.monotonic())
        batch = next(stream, None)
        if batch is None:
            return batches, asked[:-1]
        batches.append(batch)
        time.sleep(pause)


def test_the_reader_fetches_shards_ahead_in_the_order_it_reads_them(synthetic, monkeypatch):
    local, url = synthetic
    spans = expected_spans(local, 4, seed=3, window=2)
    shard = "shards/shard-{:05d}.arrow".format
    reference = list(StoreDataset(local, 4, seed=3, window=2, epochs=1, world_size=1, rank=0))
    # one shard ahead, one thread: the downloads follow the order of first use exactly
    monkeypatch.setenv("SOFTCACHE_PREFETCH", "1")
    batches, asked = read_timed(url, 0.0)
    downloads = sorted((gets(shard(i))[0], i) for i in range(12))
    assert [i for _, i in downloads] == [slot for _, _, slot in spans]
    assert all(len(gets(shard(i))) == 1 for i in range(12))
    # two ahead: every shard not read by the first batch is there before the batch that first reads it
    # is asked for, and never more than two shards not needed yet have been fetched
    FlakyFileSystem.reset()
    publish(local, "flaky://bucket/store")
    monkeypatch.setenv("SOFTCACHE_PREFETCH", "2")
    monkeypatch.setenv("SOFTCACHE_CACHE", str(local.parent / "another-cache"))
    FlakyFileSystem.latency = 0.01
    batches, asked = read_timed(url, 0.1)
    for first, _, slot in spans:
        if first > 0:
            assert gets(shard(slot))[0] < asked[first], (slot, first)
    for step, when in enumerate(asked):
        early = {slot for first, _, slot in spans if first > step and gets(shard(slot))[0] < when}
        assert len(early) <= 2, (step, early)
    for ours, theirs in zip(batches, reference, strict=True):  # the same stream as read without a mirror
        for name in theirs:
            assert np.array_equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("sizes,batch_size,world,rank", [([5, 3, 7, 4, 6, 2], 2, 2, 1), ([4] * 6, 3, 1, 0),
                                                          ([9, 1, 1, 8], 4, 3, 2)])
def test_shard_spans_give_each_shard_the_first_and_last_batch_that_read_it(sizes, batch_size, world, rank):
    ends = np.cumsum(sizes)
    order = epoch_order(sizes, 1, 2, window=2)
    slots_of = lambda rows: np.searchsorted(ends, rows, side="right")  # noqa: E731
    batches = np.arange(1, -(-sum(sizes) // (batch_size * world)), 2)  # a worker's share: every other batch
    spans = shard_spans(order, slots_of, batches, 100, batch_size, world, rank)
    reads = {}
    for batch in batches:
        rows = rank_batch(order, batch, batch_size, world, rank)
        reads[100 + int(batch)] = set(slots_of(rows[rows >= 0]).tolist())
    assert spans == sorted(spans) and len({slot for _, _, slot in spans}) == len(spans)
    assert {slot for _, _, slot in spans} == set().union(*reads.values())
    for first, last, slot in spans:
        using = [step for step, read in reads.items() if slot in read]
        assert (first, last) == (min(using), max(using))


# ---- a mirror smaller than the store ------------------------------------------------------------

def test_a_student_reads_a_store_larger_than_the_mirror_limit_with_the_local_losses(cache_config, tmp_path,
                                                                                   monkeypatch):
    from softcache.cache_job import run_cache
    from softcache.config import TrainConfig
    from softcache.train_job import run_train

    from conftest import STUDENT

    local = tmp_path / "local"
    run_cache(cache_config(out=str(local), max_sequences=48, shard_size=4))
    publish(local, "flaky://bucket/train")
    manifest = json.loads((local / "manifest.json").read_text())
    shard_bytes = [sum(f["bytes"] for f in shard["files"]) for shard in manifest["shards"]]
    kept = sum(f["bytes"] for f in manifest["files"]) + (local / "manifest.json").stat().st_size
    limit = kept + 7 * max(shard_bytes)  # a window of 4 shards being read, 2 fetched ahead, and one spare
    assert sum(shard_bytes) + kept > limit + 3 * max(shard_bytes)
    monkeypatch.setenv("SOFTCACHE_CACHE_LIMIT", str(limit))
    monkeypatch.setenv("SOFTCACHE_PREFETCH", "2")
    monkeypatch.setenv("SOFTCACHE_ATTEMPTS", "3")
    first_files = [manifest["shards"][i]["files"][-1]["path"] for i in (0, 5)]
    FlakyFileSystem.failures = {first_files[0]: 2, first_files[1]: 1}
    mirror = Mirror.at(tmp_path / "cache")
    usage = []
    FlakyFileSystem.on_get = lambda path: usage.append(mirror.usage())
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    losses = {}
    for name, store in (("local", str(local)), ("remote", "flaky://bucket/train")):
        run_train(TrainConfig(store=store, student=str(student), out=str(tmp_path / f"run-{name}"), steps=24, batch_size=4,
                              num_workers=0, progress=False, checkpoint_every=100))
        records = [json.loads(line) for line in (tmp_path / f"run-{name}" / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert len(losses["local"]) == 24 and losses["remote"] == losses["local"]
    assert max(usage) <= limit and mirror.usage() <= limit
    shard_gets = [len(gets(path)) for path in (f["path"] for s in manifest["shards"] for f in s["files"])]
    assert max(shard_gets) >= 2  # evicted in the first epoch, fetched again in the second
    assert all(len(gets(f["path"])) == 1 for f in manifest["files"])  # the tokenizer is never evicted


def test_eviction_spares_pinned_files_manifests_tokenizers_and_stores_being_written(tmp_path):
    base = tmp_path / "cache"
    store, writing = base / "stores" / "a", base / "stores" / "b"
    files = {"manifest.json": 10, "tokenizer/tokenizer.json": 10, "progress/shard-00000.json": 10,
             "shards/old.arrow": 100, "shards/pinned.arrow": 100, "shards/new.arrow": 100, "shards/x.arrow.tmp-1-2": 100}
    for number, (name, size) in enumerate(files.items()):
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_bytes(b"x" * size)
        os.utime(store / name, ns=(number * 10**9, number * 10**9))
    (writing / "shards").mkdir(parents=True)
    (writing / "shards" / "w.arrow").write_bytes(b"x" * 100)
    (writing / "writer.lock").write_text("pid")
    mirror = Mirror(base)
    assert mirror.usage() == 30 + 300 + 100 + 3  # complete files only, the writer's included
    mirror.pin([store / "shards" / "pinned.arrow"])
    mirror.make_room(0, 250)
    left = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    assert left == ["stores/a/manifest.json", "stores/a/progress/shard-00000.json", "stores/a/shards/pinned.arrow",
                    "stores/a/shards/x.arrow.tmp-1-2", "stores/a/tokenizer/tokenizer.json", "stores/b/shards/w.arrow",
                    "stores/b/writer.lock"]  # old, then new went (least recently used first); pinned stayed


# ---- several readers on one node ----------------------------------------------------------------

def test_a_file_another_reader_evicts_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    layout, encoding = make(12, 4, 3, 4)
    write_store(tmp_path / "local", "zarr", layout, encoding)
    publish(tmp_path / "local", "flaky://bucket/zarr")
    store = open_store("flaky://bucket/zarr")
    shard = store.root / "data.zarr/shards/00001"
    load, calls = ZarrReader.load, []

    def evicted_meanwhile(reader, index):  # another process deletes a chunk while this one reads the shard
        calls.append(index)
        if len(calls) == 1:
            next(p for p in sorted(shard.rglob("*")) if p.is_file() and "c" in p.relative_to(shard).parts).unlink()
        return load(reader, index)

    monkeypatch.setattr(ZarrReader, "load", evicted_meanwhile)
    rows = store.read(4, 8)  # zarr alone would read the missing chunk as zeros
    assert calls == [1, 1]
    for name, array in open_store(tmp_path / "local").read(4, 8).items():
        np.testing.assert_array_equal(rows[name], array)
    with pytest.raises(FileVanished):
        with store.storage.reading(store.shards[2].files):
            (store.root / store.shards[2].files[0].path).unlink()


def _read_all(url: str, seed: int, out: str) -> None:
    dataset = StoreDataset(url, 4, seed=seed, window=2, epochs=2, world_size=1, rank=0)
    digest = [batch["target_logprobs"].sum().item() + batch["target_ids"].sum().item() for batch in dataset]
    Path(out).write_text(json.dumps(digest))


def test_readers_sharing_a_small_mirror_read_what_they_read_alone(synthetic, tmp_path, monkeypatch):
    local, url = synthetic
    shard = max(p.stat().st_size for p in (local / "shards").iterdir())
    kept = sum(p.stat().st_size for p in local.rglob("*") if p.is_file() and "shards" not in p.parts)
    monkeypatch.setenv("SOFTCACHE_CACHE_LIMIT", str(kept + 4 * shard))  # less than the two readers' working sets
    monkeypatch.setenv("SOFTCACHE_PREFETCH", "1")
    context = multiprocessing.get_context("fork")  # the children see this process's in-memory store
    readers = [context.Process(target=_read_all, args=(url, seed, str(tmp_path / f"{seed}.json"))) for seed in (1, 2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
        assert reader.exitcode == 0
    monkeypatch.delenv("SOFTCACHE_CACHE_LIMIT")
    for seed in (1, 2):
        _read_all(str(local), seed, str(tmp_path / f"alone-{seed}.json"))
        assert json.loads((tmp_path / f"{seed}.json").read_text()) == json.loads((tmp_path / f"alone-{seed}.json").read_text())


# ---- settings -----------------------------------------------------------------------------------

def test_settings_come_from_the_environment_and_a_bad_one_is_named():
    assert RemoteSettings.from_environment({}) == RemoteSettings()
    settings = RemoteSettings.from_environment({"SOFTCACHE_ATTEMPTS": "2", "SOFTCACHE_TIMEOUT": "2.5",
                                                "SOFTCACHE_CACHE_LIMIT": "50GiB", "SOFTCACHE_PREFETCH": "0"})
    assert (settings.attempts, settings.timeout, settings.cache_limit, settings.prefetch) == (2, 2.5, 50 * 2**30, 0)
    assert [size_limit(s) for s in ("800MB", "1.5 TiB", "1000", "0", "")] == [8 * 10**8, 3 * 2**39, 1000, None, None]
    for name, value, message in (("SOFTCACHE_ATTEMPTS", "0", "a whole number of at least 1, got '0'"),
                                 ("SOFTCACHE_TIMEOUT", "soon", "a number of seconds of at least 0, got 'soon'"),
                                 ("SOFTCACHE_CACHE_LIMIT", "50 gigs", "a size such as 50GiB"),
                                 ("SOFTCACHE_PREFETCH", "-1", "a whole number of at least 0")):
        with pytest.raises(SoftcacheError, match=f"^{name} must be {message}"):
            RemoteSettings.from_environment({name: value})
