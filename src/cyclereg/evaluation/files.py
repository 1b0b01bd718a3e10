"""``cyclereg evaluate --pairs-csv``: score a model on pairs of image files, in physical units.

Per pair: Dice per label (warped moving labels against fixed labels, on the fixed grid) and their mean
over the chosen labels, HD95 in mm, folds (voxels with det J <= 0) and their percentage, the standard
deviation of log det J, the inverse-consistency error in mm (``|Φ_BA(Φ_AB(x)) - x|`` over the fixed
voxels), seconds per registration, and the volume of every label in the fixed image and in the warped
moving labels (mm³). Without label maps, Dice is that of the normalised images thresholded at 0.5.
Each pair goes through the affine stage first (:func:`~cyclereg.registration.register.align`): the scores
are those of the whole map, affine and deformable, and the seconds include the affine stage.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cyclereg.core.atomic import write_text
from cyclereg.core.errors import CycleregError, DataError, UsageError
from cyclereg.io.images import Geometry, read_image
from cyclereg.io.pairs import each_row, read_pairs_csv
from cyclereg.core.label_metrics import folded_percent, hd95, label_volumes, log_jacobian_std
from cyclereg.core.metrics import dice_labels, dice_threshold, folded
from cyclereg.io.preprocess import model_grid, prepare
from cyclereg.registration import networkfree
from cyclereg.registration.fixed_grid import on_fixed_grid
from cyclereg.registration.register import align, device_for, map_physical, read_pair, register_pair, sample_like_itk, warp_labels
from cyclereg.registration.tuning import NO_IO, InstanceOptimisation

__all__ = ["parse_labels", "evaluate_csv"]


def parse_labels(text: str | None) -> list[int] | None:
    """``--labels``: a file with one label per line (like ``eval_labels.txt``) or a comma-separated list."""
    if not text:
        return None
    source = Path(text).read_text() if Path(text).is_file() else text.replace(",", " ")
    try:
        labels = [int(v) for v in source.split()]
    except ValueError:
        raise UsageError(f"--labels {text}: expected a file of integer labels or a list like 2,3,4") from None
    if not labels:
        raise UsageError(f"--labels {text}: no labels")
    return labels


def _score_pair(model, info, row: dict, labels, tuning: InstanceOptimisation, affine, affine_similarity, device) -> dict:
    """One pair scored by ``model`` (None: without a network, on ``device``)."""
    device = device_for(model, device)
    pair = read_pair(row["fixed"], row["moving"], row.get("moving_labels") or None, dim=info.dim if info else None,
                     names=("fixed", "moving", "moving_labels"))
    t0 = time.perf_counter()
    pair = align(pair, row.get("affine") or affine, affine_similarity, device)
    reg = register_pair(model, info, pair, tuning, device)
    grid = on_fixed_grid(reg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    reverse = register_pair(model, info, pair.reversed(), tuning, device)
    back = map_physical(reverse, grid.moving_physical.double())
    g_fixed, g_moving = Geometry.of(pair.fixed), Geometry.of(pair.moving)
    spacing = tuple(reversed(g_fixed.spacing))
    det = grid.det.cpu().numpy()
    out = {"pair": row["pair"], "fixed": row["fixed"], "moving": row["moving"], "seconds": seconds,
           **({"affine_seconds": pair.affine_summary["seconds"]} if "seconds" in (pair.affine_summary or {}) else {}),
           "ic_error_mm": float((back - grid.fixed_physical.double()).norm(dim=1).mean()),
           "folds": int(folded(torch.from_numpy(det)).sum()), "folded_percent": folded_percent(det), "log_jacobian_std": log_jacobian_std(det)}
    if row.get("fixed_labels") and pair.moving_labels is not None:
        fixed_labels = sitk.GetArrayFromImage(read_image(row["fixed_labels"], "fixed_labels")).astype(np.int64)
        if fixed_labels.shape != tuple(reversed(g_fixed.size)):
            raise DataError(f"fixed_labels {row['fixed_labels']} does not have the fixed image's size")
        warped = warp_labels(pair.moving_labels, grid)
        warped = warped.round().long().cpu().numpy()
        chosen = labels or sorted(int(v) for v in np.unique(fixed_labels) if v != 0)
        dice = dice_labels(torch.from_numpy(warped)[None], torch.from_numpy(fixed_labels)[None], chosen)[0].numpy()
        dist = hd95(warped, fixed_labels, chosen, spacing)
        vol_fixed, vol_warped = label_volumes(fixed_labels, chosen, spacing), label_volumes(warped, chosen, spacing)
        out.update(dice=float(np.nanmean(dice)), hd95=float(np.nanmean(dist[np.isfinite(dist)])) if np.isfinite(dist).any() else math.nan)
        for k, lab in enumerate(chosen):
            out.update({f"dice_{lab}": float(dice[k]), f"hd95_{lab}": float(dist[k]),
                        f"volume_fixed_{lab}": float(vol_fixed[k]), f"volume_warped_{lab}": float(vol_warped[k])})
    else:
        moving = sample_like_itk(_normalised(pair.moving, info), grid.moving_domain, g_moving)
        fixed = _normalised(pair.fixed, info)
        out["dice"] = float(dice_threshold(moving, fixed)[0])
    return out


def _normalised(image, info) -> torch.Tensor:
    """An image with the model's intensity normalisation (without a network: :mod:`.networkfree`'s), on its own grid."""
    prep = replace(info.preprocess if info else networkfree.preprocessing(image), spacing=(), pad_multiple=1)
    return prepare(image, model_grid(image, prep), prep)


def _write_per_pair(path, results: list[dict]) -> None:
    """The per-pair table, whole, atomically: a crash leaves the previous one or this one."""
    columns = list(dict.fromkeys(k for r in results for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(results)
    write_text(path, buffer.getvalue())


def _scored_rows(path, rows: list[dict]) -> dict[int, dict]:
    """The rows of an earlier per-pair table that still match the pairs CSV, by index, numbers parsed."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as f:
            table = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error):
        return {}
    out = {}
    for saved in table:
        index = int(saved["pair"]) if (saved.get("pair") or "").isdigit() else -1
        if 0 <= index < len(rows) and saved.get("fixed") == rows[index]["fixed"] and saved.get("moving") == rows[index]["moving"]:
            out[index] = {k: _number(v) for k, v in saved.items() if v != ""}
    return out


def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if text.lstrip("-").isdigit() else value


def evaluate_csv(model, info, csv_path, tuning: InstanceOptimisation = NO_IO, labels=None, per_pair=None,
                 progress: bool = True, ctx=None, affine="auto", affine_similarity: str = "ncc",
                 overwrite: bool = False) -> dict | None:
    """Score every pair of ``csv_path``, each after the affine stage (``affine``: ``auto``, ``none``, a
    transform file; a column ``affine`` names one per pair); write the per-pair table to ``per_pair`` (CSV) if given and
    return the summary (means over pairs).

    With a :class:`~cyclereg.core.distributed.Context` of several processes (``torchrun``), each scores
    rows ``rank, rank + world, ...``; rank 0 gathers them, writes and returns the summary, the
    others return None. An error on any rank stops every rank with that error.

    With one process the per-pair table is rewritten whole after every pair (column ``pair``: the row's
    index), so a rerun after a crash takes the rows already scored from it and scores the rest, unless
    ``overwrite``."""
    from cyclereg.core.distributed import Context

    ctx = ctx or Context()
    rows = read_pairs_csv(csv_path)
    previous = {} if overwrite or not per_pair or ctx.world > 1 else _scored_rows(per_pair, rows)
    scored, failure = [], None

    def work(i):
        return previous[i] if i in previous else _score_pair(model, info, {**rows[i], "pair": i}, labels, tuning, affine,
                                                             affine_similarity, ctx.device)

    try:
        for i, result in each_row(csv_path, range(ctx.rank, len(rows), ctx.world), work, "evaluate", progress and ctx.main):
            scored.append((i, result))
            if per_pair and ctx.world == 1:
                _write_per_pair(per_pair, [r for _, r in sorted(scored + [(j, r) for j, r in previous.items() if j > i])])
    except CycleregError as err:  # stop every rank with the first failure of any
        failure = (err.row, type(err), str(err))
    gathered = ctx.gather((scored, failure))
    failures = sorted(f for _, f in gathered if f is not None)
    if failures:
        _, kind, message = failures[0]
        raise kind(message)
    if not ctx.main:
        return None
    results = [r for _, r in sorted(item for part, _ in gathered for item in part)]
    if per_pair:
        _write_per_pair(per_pair, results)

    def mean(key):
        values = [r[key] for r in results if key in r and np.isfinite(r[key])]
        return float(np.mean(values)) if values else math.nan

    summary = {"n_pairs": len(results), "dice": mean("dice"), "folds": mean("folds"),
               "folds_percent": mean("folded_percent"), "ic_error": mean("ic_error_mm"), "ic_error_unit": "mm",
               "seconds_per_pair": mean("seconds"), "log_jacobian_std": mean("log_jacobian_std")}
    if any("hd95" in r for r in results):
        summary["hd95"] = mean("hd95")
        label_keys = [k for k in results[0] if k.startswith("dice_")]
        summary["dice_per_label"] = {k[5:]: mean(k) for k in label_keys}
    return summary
