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
