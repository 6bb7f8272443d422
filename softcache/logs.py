"""Notes and warnings of the jobs go through :mod:`logging`, under the ``softcache`` logger.

Library code logs notes (what a job is doing: the teacher it loaded, a resume point) at INFO and
problems the user should see at WARNING; nothing is printed directly, so an application silences or
redirects them the usual way (``logging.getLogger("softcache")``). The command line shows them on
stderr; a job run with ``progress=False`` (``--no-progress``) keeps its notes to itself and still
shows warnings.
"""

from __future__ import annotations

import contextlib
import logging
import sys

LOGGER = "softcache"


def show_on_stderr() -> None:
    """Print the ``softcache`` logger's notes and warnings on stderr as bare lines (the CLI's choice)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (a CLI called twice in
    one process, as tests do, may have replaced it in between)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the current stderr is always used
        pass


@contextlib.contextmanager
def notes(enabled: bool):
    """Inside the block, the ``softcache`` notes (INFO) are dropped unless ``enabled``."""
    logger = logging.getLogger(LOGGER)
    if enabled:
        yield
        return
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def note(ranks, message: str) -> None:
    """Log ``message`` as a note once per job: on rank 0 of ``ranks`` (softcache.distributed.Ranks)."""
    if ranks.main:
        logging.getLogger(LOGGER).info(message)
