"""Scoring a model on pairs of images: Dice, folds, inverse-consistency error, time."""

from __future__ import annotations

import math
import time

import torch

from cyclereg.core.metrics import count_folds, dice_threshold, ic_error
from cyclereg.core.transforms import map_on_grid, warp

__all__ = ["score_pairs", "summarise"]


@torch.no_grad()
def score_pairs(model, moving: torch.Tensor, fixed: torch.Tensor, batch_size: int = 64, register=None) -> dict:
    """Per-pair scores of ``model`` on ``(moving[i], fixed[i])``, images ``(N, 1, *spatial)``.

    Returns lists: ``dice`` (of the images thresholded at 0.5, as in the ICON paper), ``folds``
    (grid cells where the map folds, ``det J <= 0``), ``ic_error`` (mean distance between
    ``Φ_BA(Φ_AB(x))`` and ``x`` over the fixed grid, in voxels of 1 mm) and ``seconds`` (time to compute
    ``Φ_AB``). The meanings are those of ``evaluate --pairs-csv`` (``docs/metrics.md``).
    ``register(moving, fixed) -> (Φ_AB, Φ_BA)`` replaces the plain model call when given
    (instance optimisation, for example).
    """
    model.eval()
    shape = tuple(fixed.shape[2:])
    out = {"dice": [], "folds": [], "ic_error": [], "seconds": []}
    device = next(model.parameters()).device
    for start in range(0, len(moving), batch_size):
        m = moving[start:start + batch_size].to(device)
        f = fixed[start:start + batch_size].to(device)
        t0 = time.perf_counter()
        if register is None:
            phi_ab = model(m, f)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / len(m)
            phi_ba = model(f, m)
        else:
            phi_ab, phi_ba = register(m, f)
            seconds = (time.perf_counter() - t0) / len(m)
        out["dice"] += dice_threshold(warp(m, phi_ab), f).tolist()
        out["folds"] += count_folds(map_on_grid(phi_ab, shape, m)).tolist()
        out["ic_error"] += ic_error(phi_ab, phi_ba, shape, m).tolist()
        out["seconds"] += [seconds] * len(m)
    return out


def summarise(scores: dict, shape) -> dict:
    """The JSON summary of :func:`score_pairs`: means over pairs (NaN-free)."""
    n = len(scores["dice"])
    cells = math.prod(max(s - 1, 1) for s in shape)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {
        "n_pairs": n,
        "dice": mean(scores["dice"]),
        "folds": mean(scores["folds"]),
        "folds_percent": 100.0 * mean(scores["folds"]) / cells,
        "ic_error": mean(scores["ic_error"]),
        "ic_error_unit": "mm",
        "seconds_per_pair": mean(scores["seconds"]),
    }
