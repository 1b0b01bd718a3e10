"""``cyclereg evaluate --pairs-csv``: score a model on pairs of image files."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import torch

from .errors import DataError, UsageError
from .image_io import image_to_tensor, read_image
from .metrics import count_folds, dice_labels, dice_threshold, ic_error
from .register import normalise, register_tensors
from .transforms import map_on_grid, sample

REQUIRED = ("fixed", "moving")


def read_pairs_csv(path) -> list[dict]:
    """Rows of a pairs CSV; relative paths are taken from the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--pairs-csv {path} does not exist or is not a file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"--pairs-csv {path}: missing column(s) {', '.join(missing)}; expected fixed, moving[, fixed_labels, moving_labels]")
        rows = []
        for i, row in enumerate(reader, start=2):
            if not row.get("fixed") or not row.get("moving"):
                raise DataError(f"--pairs-csv {path}, line {i}: empty fixed or moving path")
            rows.append({k: (str(path.parent / v) if v else "") for k, v in row.items() if k})
    if not rows:
        raise DataError(f"--pairs-csv {path} lists no pairs")
    return rows


def evaluate_csv(model, info, csv_path, io_steps: int = 0, io_lr: float = 2e-4) -> dict:
    """Mean Dice (over labels when both label maps are given, else of the normalised images
    thresholded at 0.5), folds on the fixed grid, inverse-consistency error and time per pair."""
    rows = read_pairs_csv(csv_path)
    device = next(model.parameters()).device
    dice, folds, cells, ic, seconds = [], [], [], [], []
    for row in rows:
        f = image_to_tensor(read_image(row["fixed"], "fixed"), f"fixed {row['fixed']}")
        m = image_to_tensor(read_image(row["moving"], "moving"), f"moving {row['moving']}")
        if f.ndim - 2 != info.dim or m.ndim - 2 != info.dim:
            raise DataError(f"pair {row['fixed']}, {row['moving']}: the model registers {info.dim}D images")
        t0 = time.perf_counter()
        phi_ab = register_tensors(model, info, m, f, io_steps, io_lr)
        seconds.append(time.perf_counter() - t0)
        phi_ba = register_tensors(model, info, f, m, io_steps, io_lr)
        with torch.no_grad():
            points = map_on_grid(phi_ab, f.shape[2:], f.to(device))
            folds.append(int(count_folds(points)))
            cells.append(math.prod(n - 1 for n in f.shape[2:]))
            ic.append(float(ic_error(phi_ab, phi_ba, info.shape, f.to(device))))
            if row.get("fixed_labels") and row.get("moving_labels"):
                fl = image_to_tensor(read_image(row["fixed_labels"], "fixed_labels"))
                ml = image_to_tensor(read_image(row["moving_labels"], "moving_labels")).to(device)
                warped = sample(ml, points, mode="nearest").cpu()
                labels = [v for v in torch.unique(fl).tolist() if v != 0]
                per_label = dice_labels(warped.round(), fl, labels)
                dice.append(float(per_label.nanmean()))
            else:
                fn = normalise(f, info.intensity, "fixed").to(device)
                mn = normalise(m, info.intensity, "moving").to(device)
                dice.append(float(dice_threshold(sample(mn, points), fn)))
    n = len(rows)
    return {"n_pairs": n, "dice": sum(dice) / n, "folds": sum(folds) / n,
            "folds_percent": 100.0 * sum(folds) / sum(cells), "ic_error": sum(ic) / n,
            "seconds_per_pair": sum(seconds) / n}
