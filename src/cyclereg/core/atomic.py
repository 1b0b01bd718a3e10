"""Atomic outputs: write to a temporary file beside the target, then rename over it, so a crash
leaves either the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from cyclereg.core.errors import UsageError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``."""
    path = Path(path)
    check_output(path)
    # Keep the real suffix last so that writers which choose a format by extension still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
