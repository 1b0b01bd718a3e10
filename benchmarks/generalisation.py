"""Does a model generalise to new people? Scored in its recipe's own training space, where nothing but the
subjects changes: every directed pair of the recipe's labelled training scans, and of the held-out labelled
subjects of ``benchmarks/real_brains.py`` prepared exactly as the recipe prepares a training scan (its affine
alignment to ``data.space``, its grid, its intensities), side by side in one run.

Rows per group of subjects: the recipe's affine alignment alone, the network, field refinement from the
identity with the settings of registration without a network (:data:`~cyclereg.registration.tuning.NETWORK_FREE`),
and the network followed by that refinement. Columns: Dice over the recipe's ``data.label_list`` on the model
grid (moving labels warped by nearest neighbour) and the box LNCC loss of the warped moving image (lower is
better). A network that gains on its training pairs and not on the held-out ones has not generalised; one that
lowers the loss without raising Dice has learned to match intensities, not anatomy. Torch on one thread.

    python benchmarks/generalisation.py CONFIG MODEL       # e.g. configs/brain3d_real.toml runs/brain3d_real/model.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_report  # noqa: E402
from real_brains import BRAINS, HELD_OUT  # noqa: E402


def scans(cfg, csv: Path | None = None):
    """The recipe's labelled training scans ``(names, images, label indices)``, or with ``csv`` those it lists."""
    from cyclereg.data.datasets import training_data

    data = training_data(dataclasses.replace(cfg, root=str(csv)) if csv else cfg)
    names = [Path(p).name.split(".")[0] for p in data.train_paths]
    keep = [k for k, labels in enumerate(data.labels) if labels.any()]
    return [names[k] for k in keep], [data.images[k].float() for k in keep], [data.labels[k].long() for k in keep]


def score_pairs(model, images, labels, n_labels: int) -> dict[str, tuple[float, float]]:
    """Mean (Dice, box LNCC loss) over every directed pair, per row."""
    from cyclereg.core.metrics import dice_labels
    from cyclereg.core.transforms import Identity, warp
    from cyclereg.losses import lncc_box_to
    from cyclereg.registration.refine import WINDOW, refine_as
    from cyclereg.registration.tuning import NETWORK_FREE

    rows = {}
    for i, j in itertools.permutations(range(len(images)), 2):
        m, f = images[i], images[j]
        with torch.no_grad():
            net = model(m, f)
        maps = {"affine alone": Identity(), "network": net,
                "refinement, no network": refine_as(NETWORK_FREE, Identity(), m, f),
                "network + refinement": refine_as(NETWORK_FREE, net, m, f)}
        similarity = lncc_box_to(f, WINDOW)  # the fixed image's window sums, once per pair
        for name, phi in maps.items():
            warped = warp(labels[i].float(), phi, mode="nearest").round().long()
            dice = dice_labels(warped[:, 0], labels[j][:, 0], range(1, n_labels + 1))[0].nanmean()
            rows.setdefault(name, []).append((float(dice), float(similarity(warp(m, phi)).mean())))
    return {name: tuple(sum(v) / len(v) for v in zip(*values)) for name, values in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="the model's training recipe (a folder dataset with data.label_list)")
    p.add_argument("model", help="a model file trained by it")
    args = p.parse_args()
    torch.set_num_threads(1)

    from cyclereg.core.config import load_config
    from cyclereg.models.modelfile import load_model

    cfg = load_config(args.config).data
    if cfg.dataset != "folder" or not cfg.label_list:
        raise SystemExit(f"{args.config}: expected a recipe with data.dataset = \"folder\" and data.label_list")
    model, info = load_model(args.model)
    n_labels = len(cfg.label_list)
    groups = {}
    train_names, images, labels = scans(cfg)
    if any(h in name for h in HELD_OUT for name in train_names):
        raise SystemExit(f"{args.config} trains on a held-out subject: {train_names}")
    groups[f"training ({', '.join(train_names)})"] = score_pairs(model, images, labels, n_labels)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "heldout.csv"
        csv.write_text("image,labels\n" + "".join(f"{BRAINS / f'{h}_t1.nii.gz'},{BRAINS / f'{h}_aseg.nii.gz'}\n" for h in HELD_OUT))
        held_names, images, labels = scans(cfg, csv)
        groups[f"held out ({', '.join(held_names)})"] = score_pairs(model, images, labels, n_labels)
    lines = ["| subjects | map | Dice | box LNCC loss |", "|---|---|---|---|"]
    for group, rows in groups.items():
        lines += [f"| {group} | {name} | {dice:.3f} | {loss:.4f} |" for name, (dice, loss) in rows.items()]
    steps = info.training.get("steps")
    body = (f"Model: {args.model} ({steps} steps of {args.config}). Every directed pair of each group of labelled subjects "
            f"in the recipe's training space (its affine alignment to data.space, its {'×'.join(map(str, info.shape))} grid); "
            f"Dice over its {n_labels} labels on that grid, box LNCC loss (lower is better); refinement: the settings of "
            "registration without a network.\n\n" + "\n".join(lines))
    print(body)
    append_report(f"Real brains: does the model generalise to new subjects? {args.model} (benchmarks/generalisation.py)", body)


if __name__ == "__main__":
    main()
