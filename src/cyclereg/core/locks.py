"""One writer per folder: a run folder (``train --out``) or a batch's output folder (``register --pairs-csv
--out-dir``) is held by one cyclereg process at a time.

The lock is a POSIX record lock (``fcntl.lockf``) on ``FOLDER/.cyclereg.lock``, which holds the owner's
process id and host for the message a second process gets. The kernel drops the lock when its process
dies, however it dies (``kill -9`` included), so a lock left by a killed job is never stale: the next
job takes it over. On release the file is removed; a process that opened it just before checks that
the lock it got is still on the folder's file, and tries again if not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from cyclereg.core.errors import UsageError

__all__ = ["LOCK_NAME", "folder_lock"]

LOCK_NAME = ".cyclereg.lock"


@contextlib.contextmanager
def folder_lock(folder, option: str, enabled: bool = True):
    """Hold ``folder`` for this process (``option`` names it in the error); ``enabled=False``: no lock
    (the other ranks of a distributed job, whose rank 0 holds it)."""
    if not enabled:
        yield
        return
    path = Path(folder) / LOCK_NAME
    while True:
        handle = open(path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"{option} {folder} is in use by {holder}; wait for it to finish or use another folder") from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed the file between our open and our lock: take the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"cyclereg process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        handle.close()
