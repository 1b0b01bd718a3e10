"""ICON Table 1 reproduced: the four architectures × λ on MNIST fives and triangles & circles.

ICON with MSE, each (architecture, λ) trained from scratch for the same reduced budget, scored on
the same held-out pairs (Dice of images thresholded at 0.5; folds per pair), printed beside the
paper's numbers. Writes a plot of Dice against folds (one curve per architecture) to
``docs/table1_<dataset>.png`` and appends the table to BENCHMARKS.md.

    python benchmarks/architectures.py --steps 400 --datasets mnist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, append_report, train_and_score  # noqa: E402

LAMBDAS = [64, 128, 256, 512, 1024, 2048]
NETS = ["mlp", "encdec", "unet", "convonly"]
# ICON paper Table 1: dataset -> network -> [(Dice, folds) for LAMBDAS]
PAPER = {
    "mnist": {
        "mlp": [(0.92, 26.61), (0.92, 9.95), (0.91, 2.48), (0.90, 0.72), (0.88, 0.34), (0.87, 0.16)],
        "encdec": [(0.80, 0.15), (0.77, 0.08), (0.72, 0.01), (0.66, 0.03), (0.62, 0.06), (0.63, 0.00)],
        "unet": [(0.93, 3.87), (0.92, 1.45), (0.90, 0.41), (0.89, 0.09), (0.86, 0.02), (0.73, 0.09)],
        "convonly": [(0.93, 30.20), (0.90, 16.27), (0.88, 7.17), (0.85, 3.12), (0.81, 0.54), (0.76, 0.07)],
    },
    "triangles": {
        "mlp": [(0.98, 1.24), (0.98, 0.73), (0.98, 0.27), (0.97, 0.10), (0.96, 0.03), (0.95, 0.03)],
        "encdec": [(0.94, 3.50), (0.90, 2.71), (0.88, 1.11), (0.87, 0.65), (0.86, 0.22), (0.85, 0.15)],
        "unet": [(0.98, 2.74), (0.98, 1.59), (0.97, 1.14), (0.96, 0.70), (0.95, 0.25), (0.94, 0.09)],
        "convonly": [(0.97, 12.57), (0.96, 10.15), (0.96, 8.49), (0.94, 6.61), (0.92, 3.91), (0.89, 2.18)],
    },
}


def config(dataset: str, net: str, lam: float, steps: int, size: int, batch: int) -> dict:
    data = ({"dataset": "mnist", "root": str(SHARED / "mnist"), "digit": 5, "holdout": 0.15}
            if dataset == "mnist" else {"dataset": "triangles", "size": size, "n_train": 6000})
    return {"data": data,
            "model": {"method": "icon", "similarity": "mse", "lam": float(lam), "steps": [{"network": net}]},
            "train": {"steps": steps, "batch_size": batch, "lr": 1e-3, "checkpoint_every": 10**9}}


def plot(dataset: str, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, source, title in ((axes[0], results, "cyclereg (this run)"), (axes[1], PAPER[dataset], "ICON paper, Table 1")):
        for net in NETS:
            if net not in source:
                continue
            pts = source[net]
            ax.plot([p[1] for p in pts], [p[0] for p in pts], "o-", label=net)
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("folds per pair")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("Dice")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: Dice against folds for λ = {', '.join(map(str, LAMBDAS))}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist,triangles")
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--lambdas", default=",".join(map(str, LAMBDAS)))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="triangles image size (the paper: 128)")
    p.add_argument("--pairs", type=int, default=200)
    args = p.parse_args(argv)
    lambdas = [int(x) for x in args.lambdas.split(",")]
    sections = []
    for dataset in args.datasets.split(","):
        results, lines = {}, ["| network | λ | Dice | folds/pair | IC error (vox) | s/step | paper Dice / folds |",
                              "|---|---|---|---|---|---|---|"]
        for net in args.nets.split(","):
            for lam in lambdas:
                m, *_ = train_and_score(config(dataset, net, lam, args.steps, args.size, args.batch), args.pairs)
                results.setdefault(net, []).append((m["dice"], m["folds"]))
                pd, pf = PAPER[dataset][net][LAMBDAS.index(lam)]
                line = (f"| {net} | {lam} | {m['dice']:.3f} | {m['folds']:.2f} | {m['ic_error']:.3f} "
                        f"| {m['seconds_per_step']:.3f} | {pd:.2f} / {pf:.2f} |")
                print(line, flush=True)
                lines.append(line)
        figure = ROOT / "docs" / f"table1_{dataset}.png"
        plot(dataset, results, figure)
        shape = "28×28" if dataset == "mnist" else f"{args.size}×{args.size} (paper: 128×128)"
        sections.append(f"### {dataset}, {shape}\n\nReduced budget: {args.steps} steps of batch {args.batch} per "
                        f"setting (ICON, MSE); {args.pairs} held-out pairs. Plot: `docs/{figure.name}`.\n\n" + "\n".join(lines))
    append_report("ICON Table 1 reproduced: architectures × λ (benchmarks/architectures.py)", "\n\n".join(sections))


if __name__ == "__main__":
    main()
