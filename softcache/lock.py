"""One process at a time in a directory: a lock file that names its holder.

The lock file holds the holder's host, pid and start time, written under O_EXCL so that two
processes cannot both create it. A lock held by a live process is refused with that process's host
and pid; one left by a dead process on this host (a killed job) is taken over; one from another host
cannot be checked from here and is refused with the path to remove if that job is gone. The teacher
job locks each store it writes (softcache.store.writer), the student job its run directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from softcache.errors import SoftcacheError


def take(path: Path, what: str, busy: str, error: type[SoftcacheError] = SoftcacheError) -> None:
    """Create the lock file ``path`` for this process, or raise ``error``: "{what} is {busy} (host, pid,
    since); wait for it to finish"."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                host, pid = holder["host"], int(holder["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # a lock torn by a crash while it was written
                continue
            if host == me["host"] and (pid == me["pid"] or not _alive(pid)):
                path.unlink(missing_ok=True)  # ours already, or its job is dead: take it over
                continue
            where = "this host" if host == me["host"] else f"host {host}"
            hint = "" if host == me["host"] else f"; if that job is gone, remove {path}"
            raise error(f"{what} is {busy} ({where}, pid {pid}, since {holder.get('since', '?')}); "
                        f"wait for it to finish{hint}")
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return
    raise error(f"{what}: could not take the lock {path}")


def release(path: Path) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    try:
        if int(json.loads(path.read_text())["pid"]) == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is running (a killed one not yet reaped does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a zombie has exited; only its process-table entry is left
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
