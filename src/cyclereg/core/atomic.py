"""Atomic outputs: write to a temporary file beside the target, then rename over it, so a crash
leaves either the old file or the new one, never a partial one; a write that runs out of room (a full
disk, a quota, the file-size limit of ``ulimit -f``) is one error naming the file, and leaves nothing."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import resource
import tempfile
from pathlib import Path

from cyclereg.core.errors import DataError, UsageError

_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("cyclereg_pending_outputs", default=None)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path`` (inside
    :func:`all_or_nothing`, when the block ends)."""
    path = Path(path)
    check_output(path)
    # Keep the real suffix last so that writers which choose a format by extension still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        pending = _PENDING.get()
        if pending is None:
            os.replace(tmp, path)
        else:
            pending.append((tmp, path))
    except Exception as err:  # any writer (ITK, torch, safetensors, matplotlib) that ran out of room: one line
        no_room = getattr(err, "errno", None) in _NO_ROOM or out_of_room(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if no_room:
            raise DataError(incomplete_write(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def all_or_nothing():
    """The outputs written (by :func:`atomic_path`) within the block appear together when it ends, or,
    if it fails, none of them: a command stopped by a full disk at its third output leaves no first two."""
    if _PENDING.get() is not None:  # nested: the outer block decides
        yield
        return
    pending: list = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        _PENDING.reset(token)
    for tmp, path in pending:
        os.replace(tmp, path)


def _limit() -> int | None:
    """The file-size limit (``ulimit -f``) in bytes, None if there is none."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _free(path) -> int:
    """Bytes free on the disk of ``path``'s folder."""
    stat = os.statvfs(Path(path).resolve().parent)
    return stat.f_bavail * stat.f_frsize


def room_for(path) -> int:
    """Bytes a new file beside ``path`` can hold: the smaller of the file-size limit and the free space."""
    limit, free = _limit(), _free(path)
    return free if limit is None else min(limit, free)


def out_of_room(written) -> bool:
    """Whether a write that failed or stopped short at ``written`` (a file) ran out of room: it reached the
    file-size limit, or its disk has under a megabyte left."""
    written = Path(written)
    size = written.stat().st_size if written.exists() else 0
    limit = _limit()
    return (limit is not None and size >= limit) or room_for(written) < (1 << 20)


def incomplete_write(path, needed: int = 0) -> str:
    """The message for an output that could not be written whole, with the likely reason."""
    path, limit = Path(path), _limit()
    if limit is not None and (needed == 0 or needed > limit):
        reason = f"over the file-size limit of {limit} bytes (ulimit -f)"
    else:
        free = _free(path)
        reason = f"its disk is full ({free} bytes free)" if free < max(needed, 1 << 20) else "a short write"
    return f"output {path} could not be written whole ({reason}); nothing was written"


def make_folder(path, option: str, expected: str = "a folder") -> Path:
    """Create the output folder ``path`` (and its parents) if missing; refuse a file in its place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; expected {expected}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot create the folder ({err.strerror})") from None
    return path


def check_output(path, option: str = "output") -> None:
    """Refuse an output path whose folder is missing or is a file, or that is itself a folder."""
    path = Path(path)
    parent = path.resolve().parent
    if not parent.exists():
        raise UsageError(f"{option} {path}: folder {path.parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {path.parent} is a file, not a folder")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; expected a file name")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: folder {path.parent} is not writable")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
