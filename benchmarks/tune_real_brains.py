"""Instance optimisation settings for a model on real brains: every directed pair of the held-out labelled
subjects of ``benchmarks/real_brains.py`` (whole 1 mm images), scored with each setting asked for, side by
side in one run. The settings a model ships with (``benchmarks/ship_model.py --io-*``) are chosen here.

The affine stage runs once per pair, first (``cyclereg``'s own, NCC), and every setting starts from that same
affine transform (the CSV's ``affine`` column), so the rows differ by the deformable stage alone; seconds per
pair are those of the deformable stage and the outputs on the fixed grid (``cyclereg evaluate``'s, without the
affine stage's 3 to 4 s). Torch on every core of this machine.

    python benchmarks/tune_real_brains.py MODEL|none "field_steps=0" "field_steps=50,field_downsample=2" "steps=10,lr=1e-4" ...

Each setting is a comma-separated list of ``InstanceOptimisation`` fields (``register --io-*`` without the
``--io-``, underscores for dashes) over the model's own defaults; ``passes=N`` runs the model N times.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_report  # noqa: E402
from real_brains import BRAINS, HELD_OUT, eval_labels, pairs_csv  # noqa: E402


def parse_setting(text: str) -> dict:
    """``"field_steps=50,field_downsample=2"`` -> ``{"io_field_steps": 50, "io_field_downsample": 2}`` (``passes`` as is)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        number = float(value) if any(c in value for c in ".e") else int(value)
        out[key if key == "passes" else f"io_{key}"] = number
    return out


def affine_pairs(folder: Path) -> Path:
    """A pairs CSV of the held-out pairs with each pair's affine transform, found once as ``register`` finds it, in ``folder``."""
    import SimpleITK as sitk

    from cyclereg.registration.register import align, read_pair

    affines = {}
    for fixed, moving in itertools.permutations(HELD_OUT, 2):
        affines[fixed, moving] = folder / f"{fixed}_{moving}.tfm"
        pair = align(read_pair(BRAINS / f"{fixed}_t1.nii.gz", BRAINS / f"{moving}_t1.nii.gz"))
        sitk.WriteTransform(pair.affine, str(affines[fixed, moving]))
        print(f"affine {moving} -> {fixed} done", flush=True)
    return pairs_csv(folder / "pairs.csv", affines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model file, or none (no network)")
    p.add_argument("settings", nargs="+", help="settings to score, e.g. field_steps=50,field_downsample=2 ('' : the model's defaults)")
    args = p.parse_args()
    settings = [parse_setting(s) for s in args.settings]

    import cyclereg

    model = args.model if args.model == "none" else cyclereg.load_model(args.model, "cpu")
    labels = eval_labels()
    name = "no network" if args.model == "none" else Path(args.model).name
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        csv = affine_pairs(Path(tmp))
        for text, options in zip(args.settings, settings):
            s = cyclereg.evaluate(model, str(csv), labels=labels, **options)
            rows.append(f"| {text or '(defaults)'} | {s['dice']:.3f} | {s['hd95']:.2f} | {s['folds_percent']:.4f} | "
                        f"{s['log_jacobian_std']:.3f} | {s['ic_error']:.2f} | {s['seconds_per_pair']:.1f} |")
            print(rows[-1], flush=True)
    origin = "" if args.model == "none" else f" ({', '.join(f'{k} {v}' for k, v in model.info.tuning.items()) or 'none'} by default)"
    body = (f"Model: {name}{origin}. Held-out subjects {', '.join(HELD_OUT)}: {len(list(itertools.permutations(HELD_OUT, 2)))} "
            "directed pairs, whole 1 mm images, each from the same cyclereg affine transform; Dice over "
            "brain/eval_labels.txt, folds and SDlogJ over the fixed image, inverse-consistency error in mm; seconds of the "
            "deformable stage and the outputs on the fixed grid (affine stage excluded).\n\n"
            "| setting | Dice | HD95 (mm) | % det J ≤ 0 | SDlogJ | IC error (mm) | s/pair |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(body)
    append_report(f"Real brains: instance optimisation settings, {name} (benchmarks/tune_real_brains.py)", body)


if __name__ == "__main__":
    main()
