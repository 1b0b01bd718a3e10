"""Errors shown to users as one line, with the exit code of the command line.

``UsageError`` (exit 2): a bad argument, option or configuration value. ``DataError`` (exit 1): an
input file or its content is not what was expected.
"""


class CycleregError(Exception):
    exit_code = 1


class UsageError(CycleregError):
    exit_code = 2


class DataError(CycleregError):
    exit_code = 1


class Interrupted(Exception):
    """A run stopped by a signal after saving what it had (exit code 128 + the signal's number)."""

    def __init__(self, signum, message: str):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
