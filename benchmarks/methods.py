"""Methods side by side on MNIST fives and triangles & circles, same network and budget:
ICON (best of a few λ), GradICON, CycleMorph (two networks and shared) and the diffusion baseline.

Reports held-out Dice, folds per pair, inverse-consistency error and seconds per training step,
and appends the table to BENCHMARKS.md.

    python benchmarks/methods.py --steps 1000 --datasets mnist,triangles
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, append_report, train_and_score  # noqa: E402

from cyclereg.evaluation.scores import score_pairs, summarise  # noqa: E402
from cyclereg.models.methods import settings_from_config
from cyclereg.registration.instance import instance_optimisation  # noqa: E402
from cyclereg.registration.tuning import InstanceOptimisation  # noqa: E402

NETWORK = {"network": "unet", "params": {"channels": [16, 32, 64, 128]}}


def variants(icon_lambdas):
    out = [(f"ICON, MSE, λ={lam:g}", {"method": "icon", "similarity": "mse", "lam": float(lam)}) for lam in icon_lambdas]
    out += [
        ("GradICON, MSE, λ=2", {"method": "gradicon", "similarity": "mse", "lam": 2.0}),
        ("CycleMorph, two networks (LNCC 9, λ_R=1, α=0.1, β=0.5)", {"method": "cyclemorph", "similarity": "lncc_box", "lam": 1.0}),
        ("CycleMorph, shared network (same)", {"method": "cyclemorph", "similarity": "lncc_box", "lam": 1.0, "shared": True}),
        # The similarity ICON and GradICON use here; λ_R scaled with it (MSE is about a tenth of 1 - LNCC).
        ("CycleMorph, two networks (MSE, λ_R=0.1, α=0.1, β=0.5)", {"method": "cyclemorph", "similarity": "mse", "lam": 0.1}),
        ("CycleMorph, shared network (MSE, same)", {"method": "cyclemorph", "similarity": "mse", "lam": 0.1, "shared": True}),
        ("diffusion, MSE, λ=0.1", {"method": "diffusion", "similarity": "mse", "lam": 0.1}),
    ]
    return out


def instance_rows(model, info, moving, fixed, steps) -> list[str]:
    """The GradICON model alone and with instance optimisation (``steps`` Adam steps per pair at two
    learning rates, weights restored after each pair), on the same pairs."""
    settings = settings_from_config(info.config.model)
    alone = summarise(score_pairs(model, moving, fixed, batch_size=1), info.shape)
    rows = [f"| GradICON alone, on the first {len(moving)} pairs | {alone['dice']:.3f} | {alone['folds']:.2f} "
            f"| {alone['folds_percent']:.3f} | {alone['ic_error']:.3f} | – |"]
    for lr in (2e-4, 1e-3):
        def register(m, f, lr=lr):
            with instance_optimisation(model, m, f, settings, InstanceOptimisation(steps, lr)) as tuned:
                return tuned(m, f), tuned(f, m)
        io = summarise(score_pairs(model, moving, fixed, batch_size=1, register=register), info.shape)
        rows.append(f"| GradICON + instance optimisation, {steps} steps, lr {lr:g} (same pairs; {io['seconds_per_pair']:.2f} s/pair) "
                    f"| {io['dice']:.3f} | {io['folds']:.2f} | {io['folds_percent']:.3f} | {io['ic_error']:.3f} | – |")
    print("\n".join(rows), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist,triangles")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="triangles image size")
    p.add_argument("--icon-lambdas", default="64,256,1024")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--io-steps", type=int, default=50, help="instance optimisation steps (GradICON model)")
    p.add_argument("--io-pairs", type=int, default=40)
    args = p.parse_args(argv)
    sections = []
    for dataset in args.datasets.split(","):
        data = ({"dataset": "mnist", "root": str(SHARED / "mnist"), "digit": 5, "holdout": 0.15}
                if dataset == "mnist" else {"dataset": "triangles", "size": args.size, "n_train": 6000})
        lines = ["| method | Dice | folds/pair | folds % | IC error (vox) | s/step |", "|---|---|---|---|---|---|"]
        for name, model in variants([float(x) for x in args.icon_lambdas.split(",")]):
            raw = {"data": data, "model": {**model, "steps": [NETWORK]},
                   "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "checkpoint_every": 10**9}}
            m, model, info, (moving, fixed) = train_and_score(raw, args.pairs)
            line = (f"| {name} | {m['dice']:.3f} | {m['folds']:.2f} | {m['folds_percent']:.3f} | {m['ic_error']:.3f} "
                    f"| {m['seconds_per_step']:.3f} |")
            print(f"[{dataset}] {line}", flush=True)
            lines.append(line)
            if raw["model"]["method"] == "gradicon" and args.io_steps:
                lines += instance_rows(model, info, moving[:args.io_pairs], fixed[:args.io_pairs], args.io_steps)
        shape = "28×28" if dataset == "mnist" else f"{args.size}×{args.size}"
        sections.append(f"### {dataset}, {shape}\n\nSame U-Net (widths 16-32-64-128), {args.steps} steps of batch "
                        f"{args.batch}, Adam lr 1e-3 for every method; {args.pairs} held-out pairs.\n\n" + "\n".join(lines))
    append_report("Methods side by side (benchmarks/methods.py)", "\n\n".join(sections))


if __name__ == "__main__":
    main()
