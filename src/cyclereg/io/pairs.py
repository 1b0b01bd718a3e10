"""Pairs CSV files (``register --pairs-csv``, ``evaluate --pairs-csv``): reading them, and working through
their rows with errors that name the line."""

from __future__ import annotations

import csv
from pathlib import Path

from cyclereg.core.errors import CycleregError, DataError, UsageError

__all__ = ["REQUIRED", "read_pairs_csv", "each_row"]

REQUIRED = ("fixed", "moving")


def read_pairs_csv(path) -> list[dict]:
    """Rows of a pairs CSV; relative paths are taken from the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--pairs-csv {path} does not exist or is not a file")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"--pairs-csv {path}: missing column(s) {', '.join(missing)}; "
                                "expected fixed, moving[, fixed_labels, moving_labels, affine]")
            rows = []
            for i, row in enumerate(reader, start=2):
                if not row.get("fixed") or not row.get("moving"):
                    raise DataError(f"--pairs-csv {path}, line {i}: empty fixed or moving path")
                row = {k: (str(path.parent / v) if v else "") for k, v in row.items() if k}
                for column in ("fixed", "moving", "fixed_labels", "moving_labels", "affine"):  # fail before any work
                    if row.get(column) and not Path(row[column]).exists():
                        raise DataError(f"--pairs-csv {path}, line {i}: {column} {row[column]} does not exist")
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"--pairs-csv {path} is not a readable CSV file ({err})") from None
    if not rows:
        raise DataError(f"--pairs-csv {path} lists no pairs")
    return rows


def each_row(csv_path, indices, work, desc: str, progress: bool = True):
    """``(i, work(i))`` for the row indices ``indices`` of ``csv_path`` (a process's share of the rows),
    with a progress bar. A :class:`~cyclereg.core.errors.CycleregError` of ``work`` is raised again, of
    its type, with the CSV's line prefixed; its ``row`` attribute is the row index."""
    from tqdm import tqdm

    for i in tqdm(list(indices), desc=desc, disable=not progress, dynamic_ncols=True):
        try:
            result = work(i)
        except CycleregError as err:
            again = type(err)(f"--pairs-csv {csv_path}, line {i + 2}: {err}")
            again.row = i
            raise again from None
        yield i, result
