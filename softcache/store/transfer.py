"""How a request to a store at a URL travels: settings from the environment, a timeout per attempt,
retries with backoff.

Object stores fail now and then and sometimes stall. Every request is one attempt of at most
``SOFTCACHE_TIMEOUT`` seconds (:func:`within`); a failed attempt is retried with exponential backoff
and jitter (tenacity) up to ``SOFTCACHE_ATTEMPTS`` attempts, each retry logged as a note (INFO), and
a request that still fails is one :class:`StoreError` naming the URL and the file
(:func:`with_retries`). A missing file or a refused permission is not retried: another attempt
would not change it. The settings are environment variables, not flags, because they describe the
node and its network rather than a job, and every command and the Python API reach remote stores.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from softcache.errors import SoftcacheError, StoreError, one_line
from softcache.logs import LOGGER
from softcache.settings import parse_size

LIMIT_ENV = "SOFTCACHE_CACHE_LIMIT"
ATTEMPTS_ENV = "SOFTCACHE_ATTEMPTS"
TIMEOUT_ENV = "SOFTCACHE_TIMEOUT"
RETRY_WAIT_ENV = "SOFTCACHE_RETRY_WAIT"
PREFETCH_ENV = "SOFTCACHE_PREFETCH"
MAX_RETRY_WAIT = 60.0
"""The longest wait between two attempts, in seconds (the backoff doubles up to it)."""
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, SoftcacheError)
"""Failures that another attempt would not change."""

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteSettings:
    """How a remote store's files travel and how much of them a node keeps: read from the environment
    (:meth:`from_environment`), so that every command and the Python API share them."""

    attempts: int = 5
    """SOFTCACHE_ATTEMPTS: attempts per request (1: no retry)."""
    timeout: float = 300.0
    """SOFTCACHE_TIMEOUT: seconds one attempt may take (a whole file, for a download); 0: no limit."""
    retry_wait: float = 1.0
    """SOFTCACHE_RETRY_WAIT: seconds before the first retry; doubled for each further one (up to 60 s),
    plus up to as much again at random (jitter, so that many readers do not retry in step)."""
    cache_limit: int | None = None
    """SOFTCACHE_CACHE_LIMIT: bytes the cache directory's stores may hold (e.g. 50GiB); None: no limit."""
    prefetch: int = 4
    """SOFTCACHE_PREFETCH: shards a training reader fetches ahead of need (0: none)."""

    @classmethod
    def from_environment(cls, environ=os.environ) -> RemoteSettings:
        """The settings the environment gives; a malformed value is one :class:`SoftcacheError` naming
        its variable."""
        default = cls()
        return cls(attempts=_number(environ, ATTEMPTS_ENV, default.attempts, int, least=1),
                   timeout=_number(environ, TIMEOUT_ENV, default.timeout, float, least=0),
                   retry_wait=_number(environ, RETRY_WAIT_ENV, default.retry_wait, float, least=0),
                   cache_limit=size_limit(environ.get(LIMIT_ENV, ""), LIMIT_ENV),
                   prefetch=_number(environ, PREFETCH_ENV, default.prefetch, int, least=0))


def _number(environ, name: str, default, kind, least):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value != value or value in (float("inf"), float("-inf")) or value < least:
        what = "a whole number" if kind is int else "a number of seconds"
        raise SoftcacheError(f"{name} must be {what} of at least {least}, got {raw!r}")
    return value


def size_limit(text: str, name: str = LIMIT_ENV) -> int | None:
    """Bytes in ``text`` (softcache.settings.parse_size: "50GiB", "800 MB", "1000000"); None for an empty
    text or 0 (no limit)."""
    if not text.strip():
        return None
    size = parse_size(text)
    if size is None:
        raise SoftcacheError(f"{name} must be a size such as 50GiB, 800MB or 1000000 (bytes), got {text!r}")
    return size or None


class TransferTimeout(TimeoutError):
    """An attempt that took longer than ``SOFTCACHE_TIMEOUT``."""


def with_retries(settings: RemoteSettings, url: str, action: str, relative: str, attempt: Callable[[], T]) -> T:
    """``attempt()`` (one request to the store at ``url`` about its file ``relative``, e.g. within
    :func:`within`) until it succeeds, fails for good or was the last attempt; then one
    :class:`StoreError` naming the URL and the file (``action``: "downloading", "uploading", ...)."""

    def note(state: tenacity.RetryCallState) -> None:  # a note: the failure, if it comes, is the one error line
        logging.getLogger(LOGGER).info(
            "%s: %s %s failed (%s); attempt %d of %d in %.1f s", url, action, relative,
            one_line(state.outcome.exception()), state.attempt_number + 1, settings.attempts, state.next_action.sleep)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.attempts),
        wait=(tenacity.wait_exponential(multiplier=settings.retry_wait, max=MAX_RETRY_WAIT)
              + tenacity.wait_random(0, settings.retry_wait)),
        retry=tenacity.retry_if_exception(lambda err: isinstance(err, Exception) and not isinstance(err, PERMANENT)),
        before_sleep=note, reraise=True)
    try:
        return retrying(attempt)
    except FileNotFoundError as err:
        raise StoreError(f"{url}: {relative} is missing") from err
    except SoftcacheError:
        raise
    except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
        raise StoreError(f"{url}: {action} {relative} was refused ({one_line(err)}); check the store's location "
                         "and your credentials") from err
    except Exception as err:
        tries = f"{settings.attempts} attempts" if settings.attempts > 1 else "1 attempt"
        raise StoreError(f"{url}: {action} {relative} failed after {tries} ({one_line(err)}); check the "
                         f"connection, or allow more with {ATTEMPTS_ENV} and {TIMEOUT_ENV}") from err


def within(seconds: float, call: Callable[[], T], abandon: Callable[[], None] | None = None) -> T:
    """``call()``, given up on after ``seconds`` (0: waited for) with :class:`TransferTimeout`.

    A Python thread cannot be stopped, so the call runs in a daemon thread of its own that is left to
    finish; ``abandon`` (e.g. deleting its temporary file) runs when it is given up on, and again
    when the thread ends, if it ends later."""
    if not seconds:
        return call()
    outcome: list = []
    given_up = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as err:  # handed to the waiting thread
            outcome.append((False, err))
        with lock:
            late = given_up.is_set()
        if late and abandon is not None:
            abandon()

    thread = threading.Thread(target=run, name="softcache-transfer", daemon=True)
    thread.start()
    thread.join(seconds)
    with lock:
        if not outcome:
            given_up.set()
    if given_up.is_set():
        if abandon is not None:
            abandon()
        raise TransferTimeout(f"no answer within {seconds:g} s ({TIMEOUT_ENV})")
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value
