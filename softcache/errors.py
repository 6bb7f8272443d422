"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a store that does not match) raises
:class:`SoftcacheError` with one sentence that names the problem and, where there is one, the flag
or file to fix. The CLI prints that sentence and exits non-zero; ``assert`` is kept for internal
invariants only.
"""


class SoftcacheError(Exception):
    """A problem the user can fix; ``str(err)`` is the one line shown to them."""


class StoreError(SoftcacheError):
    """A store on disk is missing, incomplete, corrupt or does not match the request."""


class Interrupted(KeyboardInterrupt):
    """A job stopped by the user (Ctrl-C, SIGINT); ``str(err)`` says where it stopped and how to go on.
    A KeyboardInterrupt still, so code that stops on one stops on this."""


def one_line(err: BaseException, limit: int = 240) -> str:
    """``err`` for a one-line message: its type and its text with the line breaks folded, cut at
    ``limit`` characters (a library's message may span lines, the part that matters after a colon)."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class BadRow(SoftcacheError):
    """One corpus row that cannot be used (a wrong type, an unknown role, nothing to teach, a template
    that fails on it); the rest of the corpus may be fine, so a job may skip and count such rows.

    ``str(err)`` is ``"row 7, column 'messages': turn 2 has the role 'robot'; ..."``; the reader
    that knows the file puts its name in front.
    """

    def __init__(self, row: int, columns: tuple[str, ...], reason: str):
        self.row, self.columns, self.reason = row, tuple(columns), reason
        named = " and ".join(repr(c) for c in self.columns)
        super().__init__(f"row {row}, column{'s' if len(self.columns) > 1 else ''} {named}: {reason}")
