"""The recipes' held-out scores: models trained with ``cyclereg train configs/NAME.toml --out runs/NAME``
scored on seeded pairs of their dataset's held-out images (MNIST: the last 15 % of the training file's
fives, never trained on), side by side, with training time from each run's log.

    cyclereg train configs/mnist5.toml --out runs/mnist5            # and mnist5_cyclemorph, ...
    python benchmarks/recipes.py runs/mnist5 runs/mnist5_cyclemorph --pairs 1000

Prints the table and records it (benchmarks/common.py: BENCHMARKS.md and benchmarks/history.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_report  # noqa: E402

import cyclereg  # noqa: E402


def _training(run: Path) -> dict:
    """Steps, wall time and λ of a run, from its log; a resumed run's clock restarts, so the time is the
    sum over its segments."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    seconds = sum(a["seconds"] for a, b in zip(steps, steps[1:] + [None]) if b is None or b["seconds"] < a["seconds"])
    return {"steps": steps[-1]["step"], "hours": seconds / 3600, "lam": steps[-1].get("lam")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding model.safetensors and log.jsonl")
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="heldout")
    args = p.parse_args()

    rows = []
    for run in args.runs:
        model = cyclereg.load_model(run / "model.safetensors", "cpu")
        cfg = model.info.config
        t0 = time.perf_counter()
        scores = cyclereg.evaluate(model, pairs=args.pairs, seed=args.seed, split=args.split)
        train = _training(run)
        networks = " + ".join(f"{s.network} {s.params.get('channels', '')}".strip() for s in cfg.model.steps)
        rows.append(f"| {run.name} | {cfg.model.method} | {cfg.model.similarity} | {train['lam']:g} | {networks} | "
                    f"{train['steps']} | {train['hours']:.2f} | {scores['dice']:.3f} | {scores['folds']:.3f} | "
                    f"{scores['folds_percent']:.4f} | {scores['ic_error']:.3f} | {scores['seconds_per_pair'] * 1e3:.2f} |")
        print(rows[-1], f"(scored in {time.perf_counter() - t0:.0f} s)", flush=True)
    header = ("| recipe | method | similarity | λ | networks | steps | training (h) | Dice | folds/pair | folds % | "
              "IC error (mm) | ms/pair |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = (f"{args.pairs} seeded pairs of the `{args.split}` split (seed {args.seed}); Dice of the images thresholded "
            "at 0.5, folds = cells with det J <= 0 (docs/metrics.md); training time from each run's log (the machine "
            "was shared with other work).\n\n" + header + "\n" + "\n".join(rows))
    print(body)
    append_report("Recipes: held-out scores of the trained configs (benchmarks/recipes.py)", body)


if __name__ == "__main__":
    main()
