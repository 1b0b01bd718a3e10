"""The ``cyclereg`` command line: one module per command (``add(sub)`` defines its options, ``run(args)``
carries it out). Heavy modules are imported inside each command.

Errors a user can fix are printed as one line, ``cyclereg: error: ...``, with exit code 2 for a bad
argument or config and 1 for bad data; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from cyclereg.core.version import __version__
from cyclereg.core.errors import CycleregError, Interrupted

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with errors in cyclereg's one-line form (exit code 2)."""

    def error(self, message):
        self.exit(2, f"cyclereg: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    from cyclereg.cli import affine, demo, evaluate, models, optimize, register, train

    p = _Parser(prog="cyclereg", description="Unsupervised deformable image registration with inverse and cycle consistency.")
    p.add_argument("--version", action="version", version=f"cyclereg {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in (demo, train, evaluate, register, affine, optimize, models):
        command.add(sub)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "series", None):
            from cyclereg.io.dicom import selected_series

            with selected_series(args.series):
                return args.run(args)
        return args.run(args)
    except CycleregError as err:
        if args.debug:
            raise
        print(f"cyclereg: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as stop:
        print(f"cyclereg: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("cyclereg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
