"""Corpora from elsewhere: Hugging Face datasets by name, and files at fsspec URLs.

Both end as what softcache.corpus reads locally, so shards are rebuilt from a cursor (part, row)
as for a local file:

- ``hf:owner/name`` (``hf:owner/name:config``) is ``datasets.load_dataset(name, config)``: an
  Arrow-backed, memory-mapped dataset. Offline (``HF_HUB_OFFLINE=1``, or no network) datasets
  serves a dataset it loaded once from its own cache (``HF_DATASETS_CACHE``); failing that, a
  snapshot that ``huggingface-cli download --repo-type dataset`` put in the hub cache
  (``HF_HUB_CACHE``) is loaded as a local dataset directory. Nothing else is fetched offline; online,
  datasets fetches the dataset as ``load_dataset`` always does. The stamp that decides whether a
  saved corpus index still holds is the dataset's fingerprint and its cache files' sizes and times.
- ``s3://``, ``gs://``, ``memory://``, ``file://``, ... (any fsspec URL of a file or a directory) is
  copied into a local mirror (``SOFTCACHE_CACHE``/corpora, one directory per URL, as stores are),
  each file under a temporary name first and renamed when whole, so a partial download is never
  read; a file whose remote size and time (or ETag) match the last copy is not fetched again. The
  mirror is then read as a local file or directory; the stamp is each remote file's size and time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from softcache.errors import SoftcacheError

HF_PREFIX = "hf:"
_STAMP_KEYS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created")
"""What fsspec backends report of a file's version, besides its size (each backend names its own)."""


def is_url(data: str) -> bool:
    return "://" in data


def parse_hf(data: str) -> tuple[str, str | None]:
    """``hf:owner/name[:config]`` -> (repo id, config or None)."""
    repo, _, config = data[len(HF_PREFIX):].partition(":")
    if not repo or repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise SoftcacheError(f"--data {data}: give a Hugging Face dataset as hf:owner/name or hf:owner/name:config")
    return repo, config or None


def load_hf(data: str, split: str, streaming: bool = False):
    """The ``split`` of the Hugging Face dataset ``data`` (``hf:owner/name[:config]``), a ``datasets.Dataset``;
    ``streaming``: a ``datasets.IterableDataset`` over the files of its hub-cache snapshot."""
    repo, config = parse_hf(data)
    if streaming:
        snapshot = _hub_snapshot(repo)
        if snapshot is None:
            raise SoftcacheError(f"--data {data} --streaming reads the dataset's files from the local hub cache "
                                 f"(HF_HUB_CACHE), which does not hold them; fetch them once: huggingface-cli "
                                 f"download --repo-type dataset {repo}")
        return _split(data, _quiet_load(str(snapshot), config, streaming=True), split)
    try:
        return _split(data, _quiet_load(repo, config), split)
    except SoftcacheError:
        raise
    except Exception as err:  # datasets raises many types: not cached, offline, no such config
        failure = err
    snapshot = _hub_snapshot(repo)
    if snapshot is not None:
        return _split(data, _quiet_load(str(snapshot), config), split)
    fetch = (f"fetch it once while online: huggingface-cli download --repo-type dataset {repo}, or "
             f"datasets.load_dataset({repo!r}{f', {config!r}' if config else ''})")
    if isinstance(failure, (ConnectionError, FileNotFoundError)):
        raise SoftcacheError(f"--data {data}: not in the local Hugging Face cache (HF_DATASETS_CACHE, HF_HUB_CACHE) "
                             f"and the hub cannot be reached; {fetch}") from failure
    detail = "".join(str(failure).strip().splitlines()[:1])
    raise SoftcacheError(f"--data {data} could not be loaded: {type(failure).__name__}: {detail}") from failure


def hf_stamp(data: str, dataset=None) -> list:
    """What identifies the rows of the Hugging Face dataset ``data``: a loaded ``dataset``'s fingerprint and
    its cache files' sizes and times; streamed (no ``dataset``), its hub-cache snapshot's files'."""
    if dataset is None:
        root = _hub_snapshot(parse_hf(data)[0])
        files = sorted(str(p) for p in root.rglob("*") if p.is_file()) if root is not None else []
        return [str(root), [[name, os.stat(name).st_size, os.stat(name).st_mtime_ns] for name in files]]
    files = sorted(entry["filename"] for entry in dataset.cache_files)
    return [dataset._fingerprint, [[name, os.stat(name).st_size, os.stat(name).st_mtime_ns] for name in files]]


def _quiet_load(path: str, config: str | None, streaming: bool = False):
    """``datasets.load_dataset(path, config)`` (every split) without progress bars and log lines."""
    import datasets

    datasets.disable_progress_bars()
    with quiet_datasets():
        return datasets.load_dataset(path, config, streaming=streaming)


_quieted = {"count": 0, "verbosity": None}
_quieted_lock = threading.Lock()


@contextlib.contextmanager
def quiet_datasets():
    """datasets' own error log lines silenced: the error is ours to say, in one line. A streamed file is
    parsed as it is read, so they can come while it is read, not only when it is loaded: a reading
    holds this for its whole length. Counted, so readings that overlap (a mix's sources, the next
    shard built in a thread) restore the verbosity once the last ends; entered once per reading, not
    per row (setting a logger's level clears every logger's cache: ~45 µs a row when done per row)."""
    import datasets

    with _quieted_lock:
        if _quieted["count"] == 0:
            _quieted["verbosity"] = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(logging.CRITICAL + 1)
        _quieted["count"] += 1
    try:
        yield
    finally:
        with _quieted_lock:
            _quieted["count"] -= 1
            if _quieted["count"] == 0:
                datasets.logging.set_verbosity(_quieted["verbosity"])


def _split(data: str, loaded, split: str):
    if split not in loaded:
        raise SoftcacheError(f"--data {data} has no split {split!r} (splits: {', '.join(loaded)}); "
                             "choose one with --split")
    return loaded[split]


def _hub_snapshot(repo: str) -> Path | None:
    """The hub cache's snapshot of the dataset repo ``repo`` (its main revision), never fetched; None if absent."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a cache entry that cannot be used
        return None


class Mirrored:
    """An fsspec URL's files copied into the local mirror: ``root`` (a file, or a directory holding
    them at their relative paths) and each local file's remote URL and stamp."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        fs, path, listing = _listing(self.url)
        base = Path(os.environ.get("SOFTCACHE_CACHE") or Path.home() / ".cache" / "softcache")
        home = base / "corpora" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        files, partial = home / "files", home / "partial"
        single = list(listing) == [""]
        self.root = files / path.rsplit("/", 1)[-1] if single else files
        self.remote: dict[Path, tuple[str, list]] = {}
        known = _read_stamps(home / "stamps.json")
        stamps = {}
        for relative, (remote, stamp) in sorted(listing.items()):
            local = self.root if single else files / relative
            if known.get(str(local)) != stamp or not local.is_file():
                _download(fs, remote, local, partial, self.url)
            stamps[str(local)] = stamp
            self.remote[local] = (self.url if single else f"{self.url}/{relative}", stamp)
        for stale in [p for p in files.rglob("*") if p.is_file() and p not in self.remote] if files.exists() else []:
            stale.unlink()  # gone from the remote directory since the last copy: not corpus any more
        _write_stamps(home / "stamps.json", stamps)

    def named(self, message: str) -> str:
        """``message`` with mirror paths replaced by the URLs they copy."""
        for local, (remote, _) in sorted(self.remote.items(), key=lambda item: -len(str(item[0]))):
            message = message.replace(str(local), remote)
        return message.replace(str(self.root), self.url)


def _listing(url: str):
    """The filesystem, the URL's path, and {relative path: (remote path, stamp)} of its files ("" for a file)."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            listing = {}
            for name, info in found.items():
                relative = name[len(path.rstrip("/")) + 1:]
                if info.get("type") != "directory" and not any(p.startswith(".") for p in relative.split("/")):
                    listing[relative] = (name, _stamp(info))
            if not listing:
                raise SoftcacheError(f"--data {url} holds no files to read (names starting with '.' are not read)")
            return fs, path, listing
        return fs, path, {"": (path, _stamp(fs.info(path)))}
    except SoftcacheError:
        raise
    except FileNotFoundError as err:
        raise SoftcacheError(f"--data {url} does not exist") from err
    except ImportError as err:  # fsspec knows the protocol, its backend package is not installed
        raise SoftcacheError(f"--data {url}: {err}") from err
    except Exception as err:  # an unknown protocol (ValueError), a host that cannot be reached, no permission
        detail = "".join(str(err).strip().splitlines()[:1])
        raise SoftcacheError(f"--data {url} could not be listed: {type(err).__name__}: {detail}") from err


def _stamp(info: dict) -> list:
    return [int(info.get("size") or 0), *(str(info[key]) for key in _STAMP_KEYS if info.get(key) is not None)]


def _download(fs, remote: str, local: Path, partial_dir: Path, url: str) -> None:
    """``remote`` into ``local``, through a temporary file renamed only once complete."""
    partial_dir.mkdir(parents=True, exist_ok=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_dir / f"{hashlib.sha256(str(local).encode()).hexdigest()[:16]}.{os.getpid()}"
    try:
        fs.get_file(remote, str(partial))
        os.replace(partial, local)
    except Exception as err:
        partial.unlink(missing_ok=True)
        detail = "".join(str(err).strip().splitlines()[:1])
        raise SoftcacheError(f"--data {url}: could not download {remote}: {type(err).__name__}: {detail}") from err


def _read_stamps(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_stamps(path: Path, stamps: dict) -> None:
    from softcache.store.files import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, stamps)
