"""Ship a trained model: score it on every directed pair of the held-out labelled subjects (the pairs of
benchmarks/real_brains.py, whole 1 mm images, after the affine stage) and copy it into the package's
weights folder with its provenance in the header (commit, training subjects and steps, held-out scores),
replacing the model of that name.

    python benchmarks/ship_model.py runs/brain3d_real/model.safetensors [--name brain_t1] [--passes N] [--io-field-steps N ...]

The ``--io-*`` options given (those of ``cyclereg register``) are the instance optimisation the shipped model
registers with by default: it is scored with them, and they go into its header (``cyclereg models`` lists them).

Refuses a model whose training data include a held-out subject, and a dirty working tree (the commit
would not say what trained it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402
from real_brains import HELD_OUT, eval_labels, pairs_csv  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--name", default="brain_t1")
    p.add_argument("--passes", type=int, default=1)
    from cyclereg.cli.common import add_io_options

    add_io_options(p)
    args = p.parse_args()
    tuning = {k: v for k, v in vars(args).items() if k.startswith("io_") and v is not None}

    import cyclereg
    from cyclereg.models.shipped import ship

    model = cyclereg.load_model(args.model, "cpu")
    scans = model.info.training.get("data", {}).get("all_scans") or model.info.training.get("all_scans", [])
    leaked = [s for s in scans if any(Path(s).name.startswith(f"{h}_") for h in HELD_OUT)]
    if leaked:
        raise SystemExit(f"{args.model} was trained on held-out subjects: {leaked}")
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip():
        raise SystemExit("the working tree has uncommitted changes; commit first")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        csv = pairs_csv(Path(tmp) / "pairs.csv")
        scores = cyclereg.evaluate(model, str(csv), labels=eval_labels(), passes=args.passes, **tuning)
    provenance = {"commit": commit, "subjects": scans, "steps": model.info.training.get("steps"),
                  "heldout": {"subjects": list(HELD_OUT), "passes": args.passes,
                              **{k: scores[k] for k in ("n_pairs", "dice", "hd95", "folds_percent", "log_jacobian_std",
                                                        "ic_error", "seconds_per_pair") if k in scores}}}
    out = ship(args.model, args.name, provenance, tuning={k[3:]: v for k, v in tuning.items()})
    print(f"shipped {out} ({out.stat().st_size / 2**20:.1f} MB): held-out Dice {scores['dice']:.3f} over {scores['n_pairs']} pairs")


if __name__ == "__main__":
    main()
