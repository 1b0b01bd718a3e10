"""ITK's messages as cyclereg's errors: SimpleITK's exceptions become one line naming the file, and what
ITK's C libraries print on stderr is held back."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

from cyclereg.core.errors import DataError

__all__ = ["itk_messages"]


@contextlib.contextmanager
def itk_messages(name: str, what: str, show_warnings: bool = True):
    """Turn SimpleITK's exceptions into one-line :class:`DataError` naming the file, and hold back
    what ITK's C libraries print on stderr while reading: shown if the read succeeds and
    ``show_warnings``, dropped if it fails (the error says it in one line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = None
        try:
            yield
        except RuntimeError as err:
            failed = err
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failed is not None:
            lines = [line for line in str(failed).strip().splitlines() if line.strip()]
            reason = re.sub(r"^(sitk::ERROR|ITK ERROR): (\w+\(0x[0-9a-f]+\): )?", "", lines[-1] if lines else "unknown format")
            raise DataError(f"{name} {what} ({reason.strip()})") from None
        captured.seek(0)
        text = captured.read().decode(errors="replace")
        if text and show_warnings:
            sys.stderr.write(text)
