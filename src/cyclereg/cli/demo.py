"""``cyclereg demo``: the embedded default. Trains GradICON (inverse consistency of the maps'
Jacobians) on synthetic triangles & circles on a CPU in a few minutes, then scores held-out pairs
and draws a few of them."""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_CONFIG = {
    "data": {"dataset": "triangles", "size": 64, "n_train": 2000, "val_pairs": 32},
    "model": {"method": "gradicon", "similarity": "mse", "lam": 2.0,
              "steps": [{"network": "unet", "downsample": 2, "params": {"channels": [16, 32, 64]}},
                        {"network": "unet", "params": {"channels": [16, 32, 64, 128]}}]},
    "train": {"steps": 400, "batch_size": 32, "lr": 2e-3, "val_every": 200, "checkpoint_every": 100},
}
METHOD_NAMES = {"icon": "ICON", "gradicon": "GradICON", "diffusion": "diffusion", "cyclemorph": "CycleMorph"}


def run_demo(out, steps: int | None = None) -> dict:
    import torch

    from cyclereg.core.atomic import write_text
    from cyclereg.core.config import config_from_dict
    from cyclereg.core.transforms import map_on_grid, warp
    from cyclereg.data.datasets import dataset_images, fixed_pairs
    from cyclereg.evaluation.scores import score_pairs, summarise
    from cyclereg.io.figures import pairs_figure
    from cyclereg.models.modelfile import load_model
    from cyclereg.training.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(DEMO_CONFIG))
    if steps is not None:
        raw["train"]["steps"] = steps
    cfg = config_from_dict(raw)
    name = METHOD_NAMES[cfg.model.method]
    print(f"cyclereg demo: training {name} ({len(cfg.model.steps)} U-Nets, λ={cfg.model.lam:g}) on {cfg.data.size}×{cfg.data.size} "
          f"triangles & circles for {cfg.train.steps} steps; output in {out}/")
    t0 = time.perf_counter()
    run_dir = out / "run"
    resume = (run_dir / "checkpoint.pt").exists()
    model_path = train(cfg, run_dir, resume=resume)
    train_seconds = time.perf_counter() - t0
    model, info = load_model(model_path)
    images = dataset_images(cfg.data, "test", n_test=200)
    moving, fixed = fixed_pairs(images, 100, seed=0)
    metrics = summarise(score_pairs(model, moving, fixed), info.shape)
    metrics["train_seconds"] = train_seconds
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    with torch.no_grad():
        k = 4
        phi = model(moving[:k], fixed[:k])
        warped = warp(moving[:k], phi)
        points = map_on_grid(phi, info.shape, moving[:k])
    per_pair = score_pairs(model, moving[:k], fixed[:k])
    labels = [f"Dice {d:.2f}, folds {int(n)}" for d, n in zip(per_pair["dice"], per_pair["folds"])]
    pairs_figure(out / "demo.png", moving[:k, 0].numpy(), fixed[:k, 0].numpy(), warped[:, 0].numpy(),
                 points.numpy(), labels, title=f"{name} demo: held-out Dice {metrics['dice']:.3f}, folds {metrics['folds']:.2f} per pair")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'}, {out / 'demo.png'} and the model {model_path}")
    return metrics


def add(sub) -> None:
    demo = sub.add_parser("demo", help="train on synthetic triangles & circles for a few minutes and show the result")
    demo.add_argument("--out", default="cyclereg-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    demo.set_defaults(run=run)


def run(args) -> int:
    run_demo(args.out, steps=args.steps)
    return 0
