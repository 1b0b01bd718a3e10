"""ICON Fig. 5 reproduced: direct optimisation of one pair's maps without noise, with noise
(1/8 pixel), and a U-Net trained with ICON, all with λ = 2048 on the same triangles & circles pairs.

Direct optimisation runs at several Adam step sizes (voxels, cosine-decayed), since whether the
maps without noise turn irregular depends on it. Prints and appends to BENCHMARKS.md the folds,
Dice and inverse-consistency error of each, and draws the three maps of one pair at
``--figure-lr`` to ``docs/fig5_direct_optimisation.png``.

    python benchmarks/direct_optimisation.py --size 64 --pairs 8 --unet-steps 800
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_report, train_and_score  # noqa: E402

from cyclereg.io.figures import draw_grid  # noqa: E402
from cyclereg.models.methods import LossSettings
from cyclereg.core.metrics import count_folds, dice_threshold, ic_error  # noqa: E402
from cyclereg.registration.optimize import optimize_pair  # noqa: E402
from cyclereg.core.transforms import map_on_grid, warp  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--lam", type=float, default=2048.0)
    p.add_argument("--noise", type=float, default=0.125, help="map noise in pixels")
    p.add_argument("--opt-steps", type=int, default=2000)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.125, 0.3, 0.6], help="Adam step sizes in voxels")
    p.add_argument("--figure-lr", type=float, default=0.6)
    p.add_argument("--unet-steps", type=int, default=1500)
    args = p.parse_args(argv)
    if args.figure_lr not in args.lrs:
        p.error(f"--figure-lr {args.figure_lr:g} must be one of --lrs")

    raw = {"data": {"dataset": "triangles", "size": args.size, "n_train": 6000},
           "model": {"method": "icon", "similarity": "mse", "lam": args.lam,
                     "steps": [{"network": "unet", "params": {"channels": [16, 32, 64, 128]}}]},
           "train": {"steps": args.unet_steps, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 10**9}}
    _, model, info, (moving, fixed) = train_and_score(raw, pairs=args.pairs)
    shape = info.shape
    results, maps = {}, {}
    for lr in args.lrs:
        for name, noise in (("direct, no noise", 0.0), (f"direct, noise {args.noise:g} px", args.noise)):
            rows = []
            for i in range(args.pairs):
                m, f = moving[i:i + 1], fixed[i:i + 1]
                phi_ab, phi_ba, _ = optimize_pair(m, f, LossSettings("icon", "mse", args.lam, noise), steps=args.opt_steps, lr=lr)
                with torch.no_grad():
                    pts = map_on_grid(phi_ab, shape, m)
                    rows.append((float(dice_threshold(warp(m, phi_ab), f)), int(count_folds(pts)), float(ic_error(phi_ab, phi_ba, shape, m))))
                if i == 0 and lr == args.figure_lr:
                    maps[f"{name}, step {lr:g} px"] = (warp(m, phi_ab)[0, 0], pts[0])
            results[(name, f"{lr:g}")] = rows
    with torch.no_grad():
        phi_ab, phi_ba = model(moving, fixed), model(fixed, moving)
        pts = map_on_grid(phi_ab, shape, moving)
        results[("U-Net (ICON)", "n/a")] = list(zip(dice_threshold(warp(moving, phi_ab), fixed).tolist(), count_folds(pts).tolist(),
                                           ic_error(phi_ab, phi_ba, shape, moving).tolist()))
        maps["U-Net (ICON)"] = (warp(moving[:1], phi_ab.take(torch.tensor([0])))[0, 0], pts[0])

    lines = ["| registration | Adam step (px) | Dice | folds/pair | IC error (px) |", "|---|---|---|---|---|"]
    for (name, lr), rows in results.items():
        n = len(rows)
        lines.append(f"| {name} | {lr} | {sum(r[0] for r in rows) / n:.3f} | {sum(r[1] for r in rows) / n:.1f} | {sum(r[2] for r in rows) / n:.3f} |")
    table = "\n".join(lines)
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(13, 2.9))
    axes[0].imshow(moving[0, 0], cmap="gray")
    axes[0].set_title("moving", fontsize=9)
    axes[1].imshow(fixed[0, 0], cmap="gray")
    axes[1].set_title("fixed", fontsize=9)
    for ax, (name, (warped, pts)) in zip(axes[2:], maps.items()):
        ax.imshow(warped, cmap="gray")
        draw_grid(ax, pts.numpy(), lines=24)
        ax.set_title(name, fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"ICON Fig. 5: λ = {args.lam:g}, triangles & circles {args.size}×{args.size}", fontsize=10)
    fig.tight_layout()
    out = ROOT / "docs" / "fig5_direct_optimisation.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=100)
    append_report("ICON Fig. 5: direct optimisation against a U-Net (benchmarks/direct_optimisation.py)",
                  f"{args.pairs} held-out triangles & circles pairs, {args.size}×{args.size}, ICON with MSE, λ = {args.lam:g}; "
                  f"direct optimisation: {args.opt_steps} Adam steps per pair, the step size decayed along a cosine; U-Net: {args.unet_steps} training steps of batch 32. "
                  f"Maps of the first pair (direct optimisation at step {args.figure_lr:g} px): `docs/{out.name}`.\n\n{table}")


if __name__ == "__main__":
    main()
