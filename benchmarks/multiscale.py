"""CycleMorph's multi-scale scheme on triangles & circles: a two-step model (global step on the image
downsampled by 2, local step at full resolution) whose local step is trained on whole images or on
patches, and registered whole or on blended patches.

Seams would show at the patch borders, so Dice and folds are reported separately for a band of
pixels around the inner patch borders and for the rest of the image. Appends the table to
BENCHMARKS.md.

    python benchmarks/multiscale.py --steps 300 --patch 32 --overlap 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report, train_and_score  # noqa: E402

from cyclereg.core.metrics import jacobian_determinant  # noqa: E402
from cyclereg.models.multiscale import multiscale_register, patch_starts  # noqa: E402
from cyclereg.core.transforms import map_on_grid, warp  # noqa: E402

NETWORK = {"network": "unet", "params": {"channels": [16, 32, 64]}}
METHODS = {
    "cyclemorph": {"method": "cyclemorph", "similarity": "mse", "lam": 0.1},
    "gradicon": {"method": "gradicon", "similarity": "mse", "lam": 2.0},
}


def border_band(n: int, patch: int, overlap: int, width: int) -> torch.Tensor:
    """``(n, n)`` mask of the pixels within ``width`` of an inner patch border, along either axis."""
    starts = patch_starts(n, patch, overlap)
    edges = {e for s in starts for e in (s, s + patch)} - {0, n}
    near = torch.zeros(n, dtype=torch.bool)
    for e in edges:
        near[max(e - width, 0):min(e + width, n)] = True
    return near.view(-1, 1) | near.view(1, -1)


def region_scores(register, moving, fixed, band) -> dict:
    """Pooled Dice (thresholded at 0.5) and % folded cells inside ``band`` and outside it."""
    sums = {k: torch.zeros(4, dtype=torch.float64) for k in ("band", "inside")}  # inter, size a + b, folds, cells
    seconds = 0.0
    for i in range(0, len(moving), 32):
        m, f = moving[i:i + 32], fixed[i:i + 32]
        t0 = time.perf_counter()
        with torch.no_grad():
            phi = register(m, f)
        seconds += time.perf_counter() - t0
        a, b = warp(m, phi)[:, 0] > 0.5, f[:, 0] > 0.5
        folded = jacobian_determinant(map_on_grid(phi, f.shape[2:], m)) < 0  # (N, n-1, n-1): cell at its corner
        for name, mask in (("band", band), ("inside", ~band)):
            cells = mask[:-1, :-1]
            sums[name] += torch.tensor([float((a & b & mask).sum()), float((a & mask).sum() + (b & mask).sum()),
                                        float((folded & cells).sum()), float(cells.sum()) * len(m)], dtype=torch.float64)
    out = {"seconds": seconds / len(moving)}
    for name, (inter, size, folds, cells) in sums.items():
        out[f"dice_{name}"] = float(2 * inter / size)
        out[f"folds_{name}"] = float(100 * folds / cells)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="training steps; half for the global step, half for the local")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--overlap", type=int, default=8)
    p.add_argument("--band", type=int, default=3, help="half-width of the border band in pixels")
    p.add_argument("--method", choices=sorted(METHODS), default="cyclemorph")
    p.add_argument("--pairs", type=int, default=100)
    args = p.parse_args(argv)

    patch, overlap = (args.patch,) * 2, (args.overlap,) * 2
    band = border_band(args.size, args.patch, args.overlap, args.band)
    lines = ["| local step trained on | registered | Dice, border band | Dice, inside | % folded, border band "
             "| % folded, inside | s/pair |", "|---|---|---|---|---|---|---|"]
    for trained_on, stage_patch in (("whole images", []), (f"{args.patch}² patches", list(patch))):
        raw = {"data": {"dataset": "triangles", "size": args.size, "n_train": 6000},
               "model": {**METHODS[args.method], "steps": [{**NETWORK, "downsample": 2}, NETWORK]},
               "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "checkpoint_every": 10**9,
                         "stages": [{"fraction": 0.5, "train": [0]}, {"fraction": 0.5, "train": [1], "patch": stage_patch}]}}
        _, model, _, (moving, fixed) = train_and_score(raw, args.pairs)
        for registered, register in (("whole", model),
                                     (f"{args.patch}² patches, overlap {args.overlap}",
                                      lambda m, f: multiscale_register(model, m, f, patch, overlap))):
            s = region_scores(register, moving, fixed, band)
            line = (f"| {trained_on} | {registered} | {s['dice_band']:.3f} | {s['dice_inside']:.3f} | {s['folds_band']:.3f} "
                    f"| {s['folds_inside']:.3f} | {s['seconds'] * 1000:.1f} ms |")
            print(line, flush=True)
            lines.append(line)
    table = "\n".join(lines)
    append_report("CycleMorph's multi-scale scheme: patches at training and registration (benchmarks/multiscale.py)",
                  f"{args.pairs} held-out triangles & circles pairs, {args.size}×{args.size}; {args.method} with MSE; "
                  f"two steps (U-Net 16-32-64 on the image halved, then at full resolution), {args.steps} steps of batch "
                  f"{args.batch}: the first half trains the global step, the second the local step. Border band: pixels "
                  f"within {args.band} of an inner patch border ({band.float().mean() * 100:.0f} % of the image).\n\n{table}")


if __name__ == "__main__":
    main()
