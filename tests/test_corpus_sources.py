"""softcache.corpus_sources: --data as a Hugging Face dataset by name (offline, from the local caches)
and as an fsspec URL (through a local mirror) reads the same rows, and makes the same store, as the
local file they hold.

Nothing is downloaded: datasets and huggingface_hub run in offline mode over caches built here, in
the layouts they write themselves (a dataset loaded once: datasets' prepared Arrow files; a repo
fetched with ``huggingface-cli download``: the hub cache's snapshot); URLs use fsspec's in-memory
filesystem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from softcache.corpus import python_docs, read_rows
from softcache.corpus_stream import corpus_key
from softcache.errors import SoftcacheError

from conftest import put_in_hub_cache, store_files

REPO = "owner/tiny-corpus"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """datasets and huggingface_hub offline, over empty caches under ``tmp_path``; the softcache mirror there too."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "softcache-cache"))
    return tmp_path


def put_in_datasets_cache(cache: Path, repo_id: str, data_files: dict[str, Path]) -> Path:
    """What ``datasets.load_dataset(repo_id)`` leaves in HF_DATASETS_CACHE ``cache`` once it has loaded a
    dataset of JSON files: its prepared Arrow files and dataset_info.json under
    ``owner___name/default/0.0.0/<commit>``. Made by datasets' JSON builder, then moved into place."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    builder = Json(cache_dir=str(cache / "building"), dataset_name=name, config_name="default",
                   data_files={split: str(path) for split, path in data_files.items()}, hash="0123456789" * 4)
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / Path(builder.cache_dir).name
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(cache / "building")
    return target


def values(rows) -> list:
    return [value for _, _, value in rows]


def test_a_dataset_loaded_once_is_read_by_name_offline(offline, corpus_file, cache_config):
    from softcache.cache_job import run_cache

    heldout = offline / "heldout.jsonl"
    heldout.write_text(json.dumps({"text": "held out"}) + "\n")
    put_in_datasets_cache(offline / "datasets-cache", REPO, {"train": corpus_file, "test": heldout})
    rows = read_rows(f"hf:{REPO}")
    assert values(rows) == values(read_rows(str(corpus_file)))
    assert [where for where, _, _ in rows][:1] == [f"hf:{REPO}"]
    assert values(read_rows(f"hf:{REPO}:default", split="test")) == ["held out"]
    assert list(rows.positioned((0, 17)))[0][1:] == (f"hf:{REPO}", 17, python_docs()[57])  # random access
    assert corpus_key({}, rows, "t") == corpus_key({}, read_rows(f"hf:{REPO}"), "t")  # a saved index is reused

    run_cache(cache_config(out=str(offline / "local")))
    run_cache(cache_config(out=str(offline / "hub"), data=f"hf:{REPO}"))
    assert store_files(offline / "hub") == store_files(offline / "local")
    assert json.loads((offline / "hub" / "manifest.json").read_text())["corpus"]["source"] == f"hf:{REPO}"


def test_a_hub_cache_snapshot_is_read_by_name_offline(offline, corpus_file):
    files = offline / "repo"
    files.mkdir()
    shutil.copy(corpus_file, files / "train.jsonl")
    (files / "test.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    put_in_hub_cache(offline / "hub-cache", REPO, files, repo_type="dataset")
    assert values(read_rows(f"hf:{REPO}")) == values(read_rows(str(corpus_file)))
    assert values(read_rows(f"hf:{REPO}", split="test")) == ["held out"]
    with pytest.raises(SoftcacheError, match=rf"^--data hf:{REPO} has no split 'dev' \(splits: train, test\); "
                                             "choose one with --split$"):
        read_rows(f"hf:{REPO}", split="dev")


def test_a_dataset_in_no_cache_is_one_line_saying_how_to_fetch_it(offline):
    with pytest.raises(SoftcacheError, match=r"^--data hf:nobody/nothing:cfg: not in the local Hugging Face cache .* "
                                             r"fetch it once while online: huggingface-cli download --repo-type "
                                             r"dataset nobody/nothing, or datasets.load_dataset\('nobody/nothing', "
                                             r"'cfg'\)$"):
        read_rows("hf:nobody/nothing:cfg")
    for bad in ("hf:", "hf:a/b/c", "hf:/x"):
        with pytest.raises(SoftcacheError, match="give a Hugging Face dataset as hf:owner/name or hf:owner/name:co"):
            read_rows(bad)


@pytest.fixture
def memory(offline):
    """A fresh fsspec in-memory filesystem root (memory:// is one store per process)."""
    fs = fsspec.filesystem("memory")
    root = f"/{offline.name}"
    yield fs, root
    fs.rm(root, recursive=True) if fs.exists(root) else None


def test_a_job_on_a_url_makes_the_store_of_the_local_file(memory, corpus_file, cache_config, offline, monkeypatch):
    from softcache import corpus_sources
    from softcache.cache_job import run_cache

    fs, root = memory
    fs.pipe(f"{root}/corpus.jsonl", corpus_file.read_bytes())
    url = f"memory://{root}/corpus.jsonl"
    run_cache(cache_config(out=str(offline / "local")))
    run_cache(cache_config(out=str(offline / "remote"), data=url))
    assert store_files(offline / "remote") == store_files(offline / "local")

    downloads = []
    original = corpus_sources._download
    monkeypatch.setattr(corpus_sources, "_download", lambda *args: downloads.append(args[1]) or original(*args))
    rows = read_rows(url)
    assert downloads == [] and [where for where, _, _ in rows][:1] == [url]  # the mirror's copy is still current
    key = corpus_key({}, rows, "t")
    fs.pipe(f"{root}/corpus.jsonl", corpus_file.read_bytes() + b'{"text": "one more"}\n')
    changed = read_rows(url)
    assert len(downloads) == 1 and values(changed)[-1] == "one more" and corpus_key({}, changed, "t") != key


def test_a_url_of_a_directory_is_read_as_the_local_directory(memory, tmp_path):
    fs, root = memory
    local = tmp_path / "local"
    (local / "train").mkdir(parents=True)
    (local / "test").mkdir()
    (local / "train" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "two"]))
    (local / "train" / "b.txt").write_text(python_docs()[1])
    (local / "test" / "c.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe(f"{root}/{path.relative_to(local)}", path.read_bytes())
    fs.pipe(f"{root}/.hidden.bin", b"\0")  # not read, as in a local directory
    url = f"memory://{root}"
    for split in ("train", "test"):
        assert list(read_rows(url, split=split)) == [
            (where.replace(str(local), url), row, value) for where, row, value in read_rows(str(local), split=split)]
    fs.rm(f"{root}/train/b.txt")
    assert values(read_rows(url)) == ["one", "two"]  # a file gone from the directory is gone from the mirror


def test_url_mistakes_name_the_url(memory):
    fs, root = memory
    fs.pipe(f"{root}/bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(SoftcacheError, match=rf"^--data memory://{root}/bad.jsonl line 2"):
        read_rows(f"memory://{root}/bad.jsonl")
    with pytest.raises(SoftcacheError, match=rf"^--data memory://{root}/nothing.jsonl does not exist$"):
        read_rows(f"memory://{root}/nothing.jsonl")
    with pytest.raises(SoftcacheError, match=r"^--data nosuch://x/c.jsonl could not be listed: ValueError: "):
        read_rows("nosuch://x/c.jsonl")


def test_a_failed_download_leaves_nothing_to_read(memory, monkeypatch, offline):
    fs, root = memory
    fs.pipe(f"{root}/c.jsonl", b'{"text": "a"}\n')

    def broken(self, remote, local, **kwargs):
        Path(local).write_bytes(b'{"te')  # part of the file, then the connection drops
        raise ConnectionResetError("connection reset")

    monkeypatch.setattr(type(fs), "get_file", broken)
    with pytest.raises(SoftcacheError, match=rf"^--data memory://{root}/c.jsonl: could not download .*"
                                             "ConnectionResetError: connection reset$"):
        read_rows(f"memory://{root}/c.jsonl")
    mirror = offline / "softcache-cache" / "corpora"
    assert not [p for p in mirror.rglob("*") if p.is_file()]
    monkeypatch.undo()
