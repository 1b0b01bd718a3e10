"""ICON Table 1 side by side: cyclereg's recipes against the ICON authors' package.

For MNIST fives (``../shared/data/mnist``, the last 15 % of the fives held out) and triangles &
circles, trains cyclereg's recipe config and ``icon_registration`` (same method, similarity, λ,
learning rate, batch size and the same sequence of training pairs; its tallUNet2 network) for the
same number of steps, in one run, and scores both with cyclereg's evaluation on the same held-out
pairs. ``icon_registration`` is also scored at the moment its training time reached cyclereg's total
(Dice after the same wall-clock budget). Appends a table to BENCHMARKS.md.

    python benchmarks/table1.py                 # full recipes
    python benchmarks/table1.py --steps 500     # reduced budget (said in the table)

Needs the reference package: ``pip install -c constraints.txt icon_registration==1.1.9`` (see ``benchmarks/requirements-reference.txt``)
then ``pip uninstall -y torchvision``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, append_report  # noqa: E402

from cyclereg.core.config import load_config  # noqa: E402
from cyclereg.data.datasets import dataset_images, fixed_pairs, random_pairs  # noqa: E402
from cyclereg.evaluation.scores import score_pairs, summarise  # noqa: E402
from cyclereg.models.modelfile import load_model  # noqa: E402
from cyclereg.training.train import train  # noqa: E402
from cyclereg.core.transforms import DisplacementField  # noqa: E402
from cyclereg.core.coords import identity_grid  # noqa: E402

# ICON paper, Table 1, U-Net column: λ -> (Dice, folds)
PAPER = {
    "mnist": {64: (0.93, 3.87), 128: (0.92, 1.45), 256: (0.90, 0.41), 512: (0.89, 0.09), 1024: (0.86, 0.02), 2048: (0.73, 0.09)},
    "triangles": {64: (0.98, 2.74), 128: (0.98, 1.59), 256: (0.97, 1.14), 512: (0.96, 0.70), 1024: (0.95, 0.25), 2048: (0.94, 0.09)},
}
CONFIGS = {"mnist": ROOT / "configs" / "mnist5.toml", "triangles": ROOT / "configs" / "triangles.toml"}


class _IconAsModel(torch.nn.Module):
    """Wrap an icon_registration model so cyclereg's evaluation can call it: (moving, fixed) -> Transform."""

    def __init__(self, icon_model):
        super().__init__()
        import reference_icon

        self.icon_model, self.ref = icon_model, reference_icon

    def forward(self, moving, fixed):
        phi = self.ref.predict_map(self.icon_model, moving, fixed)
        return DisplacementField(phi - identity_grid(phi.shape[2:], phi.device, phi.dtype))


def _paper_row(dataset, lam, method):
    if method != "icon":
        return "n/a (paper: ICON only)"
    best = min(PAPER[dataset], key=lambda k: abs(k - lam))
    dice, folds = PAPER[dataset][best]
    return f"{dice:.2f} / {folds:.2f} (λ={best})"


def run(dataset: str, steps: int | None, pairs: int) -> list[dict]:
    import reference_icon

    overrides = [f"data.root={SHARED / 'mnist'}"] if dataset == "mnist" else []
    if steps:
        overrides.append(f"train.steps={steps}")
    overrides += ["train.val_every=1000000"]
    cfg = load_config(CONFIGS[dataset], overrides)
    held = dataset_images(cfg.data, "heldout" if dataset == "mnist" else "test", n_test=2 * pairs)
    moving, fixed = fixed_pairs(held, pairs, seed=1)
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = train(cfg, tmp, progress=False)
        ours_seconds = time.perf_counter() - t0
        model, info = load_model(path)
        ours = summarise(score_pairs(model, moving, fixed), info.shape)
    n_steps = cfg.train.steps
    rows.append({"impl": "cyclereg", "method": cfg.model.method, "lam": cfg.model.lam, "steps": n_steps,
                 "sec_step": ours_seconds / n_steps, **ours, "dice_wall": ours["dice"]})
    print(f"[{dataset}] cyclereg: {rows[-1]}", flush=True)

    # icon_registration: same method, similarity, lambda, lr, batch size and pair sequence.
    torch.manual_seed(cfg.train.seed)
    images = dataset_images(cfg.data, "train")
    ref = reference_icon.make_icon_model(cfg.model.method, cfg.model.lam, tuple(images.shape[2:]), cfg.model.similarity)
    optimizer = torch.optim.Adam(ref.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    wrapped = _IconAsModel(ref)
    elapsed, step, at_wall, at_steps = 0.0, 0, None, None
    while at_steps is None or at_wall is None:
        idx = random_pairs(len(images), cfg.train.batch_size, generator)
        t0 = time.perf_counter()
        reference_icon.train_step(ref, optimizer, images[idx[:, 0]], images[idx[:, 1]])
        elapsed += time.perf_counter() - t0
        step += 1
        if at_wall is None and (elapsed >= ours_seconds or step >= 4 * n_steps):
            at_wall = summarise(score_pairs(wrapped, moving, fixed), info.shape)
            at_wall["steps"] = step
        if step == n_steps:
            at_steps = summarise(score_pairs(wrapped, moving, fixed), info.shape)
            ref_sec_step = elapsed / step
    rows.append({"impl": "icon_registration (tallUNet2)", "method": cfg.model.method, "lam": cfg.model.lam,
                 "steps": n_steps, "sec_step": ref_sec_step, **at_steps, "dice_wall": at_wall["dice"],
                 "wall_steps": at_wall["steps"], "wall_folds": at_wall["folds"]})
    print(f"[{dataset}] icon_registration: {rows[-1]}", flush=True)
    for r in rows:
        r["dataset"], r["paper"] = dataset, _paper_row(dataset, r["lam"], r["method"])
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist,triangles")
    p.add_argument("--steps", default=None,
                   help="training steps for both: N, or per dataset as mnist=N,triangles=M (default: each recipe's)")
    p.add_argument("--pairs", type=int, default=200, help="held-out pairs scored")
    args = p.parse_args(argv)
    steps = {}
    if args.steps:
        for item in args.steps.split(","):
            name, _, value = item.rpartition("=")
            steps[name or "*"] = int(value)
    rows = []
    for dataset in args.datasets.split(","):
        rows += run(dataset, steps.get(dataset, steps.get("*")), args.pairs)
    header = ("| data | implementation | method, λ | steps | s/step | Dice | folds/pair | IC error (vox) "
              "| Dice at cyclereg's wall-clock (steps, folds) | paper U-Net Dice / folds |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        wall = f"{r['dice_wall']:.3f}" + (f" ({r['wall_steps']} steps, {r['wall_folds']:.2f} folds)" if "wall_steps" in r else "")
        lines.append(f"| {r['dataset']} | {r['impl']} | {r['method']}, {r['lam']:g} | {r['steps']} | {r['sec_step']:.3f} "
                     f"| {r['dice']:.3f} | {r['folds']:.2f} | {r['ic_error']:.3f} | {wall} | {r['paper']} |")
    ratios = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ours, ref = [r for r in rows if r["dataset"] == dataset]
        ratios.append(f"- {dataset}: cyclereg's seconds per step are {ours['sec_step'] / ref['sec_step']:.2f}× icon_registration's.")
    budget = (f"Budget: reduced to {args.steps} steps for both." if args.steps else "Budget: each recipe's full step count.")
    table = "\n".join(lines) + "\n\n" + "\n".join(ratios) + f"\n\n{budget} Held-out pairs: {args.pairs}. " \
        "Dice of the images thresholded at 0.5; folds = cells with negative Jacobian determinant, per pair."
    print(table)
    append_report("ICON Table 1 side by side (benchmarks/table1.py)", table)


if __name__ == "__main__":
    main()
