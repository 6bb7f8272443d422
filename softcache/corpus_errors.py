"""Why a corpus file could not be read, in one line that names the file and the place in it.

datasets reports a bad file as a wrapper (``DatasetGenerationError: An error occurred while
generating the dataset``) around a parser's error that rarely names the file, the line or the
byte. So when datasets fails on a file, the file is checked here directly (UTF-8, then JSON line by
line) and that finding is reported; only when the check finds nothing is the first cause in the
exception chain that is not a datasets wrapper shown. The checks run only after a failure, so a
good corpus is read once.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

_CHUNK = 1 << 20  # bytes per read while checking a file
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def unreadable(path: Path, builder: str, text_column: str | None, err: BaseException) -> str:
    """The line to show for ``path``, which the datasets ``builder`` failed to read with ``err``
    (``text_column``: the column that must hold strings, None for chat rows)."""
    found = None
    if builder in ("json", "csv"):
        found = encoding_problem(path)
    if found is None and builder == "json":
        found = json_problem(path, text_column)
    if found is not None:
        return found
    cause = _first_cause(err)
    detail = "".join(str(cause).strip().splitlines()[:1])
    return f"--data {path} could not be read as {builder}: {type(cause).__name__}" + (f": {detail}" if detail else "")


def encoding_problem(path: Path) -> str | None:
    """Where ``path`` stops being UTF-8 text (an invalid byte, or a NUL, which no text holds), or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        head = handle.read(2)
        handle.seek(0)
        offset = 0  # bytes handed to the decoder so far
        while True:
            chunk = handle.read(_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character carried over
            nul = chunk.find(b"\0")
            try:
                decoder.decode(chunk if nul < 0 else chunk[:nul], final=not chunk)
            except UnicodeDecodeError as err:
                return _not_utf8(path, offset - pending + err.start, err.reason, head)
            if nul >= 0:
                return _not_utf8(path, offset + nul, "is a NUL", head)
            if not chunk:
                return None
            offset += len(chunk)


def _not_utf8(path: Path, offset: int, reason: str, head: bytes) -> str:
    if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) or reason == "is a NUL":
        likely, source = "it looks like UTF-16", "UTF-16"
    else:
        likely, source = "it may be Latin-1 or Windows-1252", "LATIN1"
    return (f"--data {path} is not UTF-8 (byte {offset:,} {reason}; {likely}); re-encode it as UTF-8, "
            f"e.g. iconv -f {source} -t UTF-8")


def json_problem(path: Path, text_column: str | None) -> str | None:
    """The first line of the JSON-lines file ``path`` that is not a JSON object with a string (or
    null, or no) ``text_column`` (any object when None); a file whose first line is not JSON is checked
    as one JSON document."""
    first = True
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip(b"\r\n"))
            except ValueError as err:
                if first:  # a pretty-printed document or array, not JSON lines
                    return _document_problem(path)
                return f"--data {path} line {number}{_reason(err)}"
            first = False
            if not isinstance(row, dict):
                return f"--data {path} line {number}: a JSON {_json_type(row)}, not an object"
            value = None if text_column is None else row.get(text_column)
            if value is not None and not isinstance(value, str):
                return (f"--data {path} line {number}: {text_column!r} is a JSON {_json_type(value)}, not a string; "
                        "choose a text column with --text-column")
    return None


def _document_problem(path: Path) -> str | None:
    """Where the whole-file JSON document ``path`` is broken, or None if it parses."""
    try:
        with open(path, "rb") as handle:
            json.load(handle)
    except ValueError as err:
        where = f" line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        return f"--data {path}{where}{_reason(err)}"
    return None


def _reason(err: ValueError) -> str:
    """', column 7: not valid JSON (Expecting value)'"""
    if isinstance(err, json.JSONDecodeError):
        return f", column {err.colno}: not valid JSON ({err.msg.removesuffix(' at')})"
    return f": not valid JSON ({err})"


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _first_cause(err: BaseException) -> BaseException:
    """The first exception in ``err``'s chain (``__cause__``, else ``__context__``) not raised by
    datasets itself: the parser's own error inside datasets' wrappers."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        if not type(err).__module__.startswith("datasets"):
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return seen[-1]
