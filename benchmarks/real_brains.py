"""Real brains of different people, each in its own scanner space: every directed pair of the held-out
labelled subjects, whole 1 mm images, files in and out, side by side in one run.

Rows: no registration; ANTs Affine (antspyx ``type_of_transform="Affine"``, its defaults; skipped with a
note when antspyx is not installed, see requirements-reference.txt) and, with ``--syn``, ANTs SyN (its
defaults, which include its own affine stage); ``cyclereg affine`` with NCC and with MI; with ``--model M``,
``cyclereg register --model M`` (its affine stage, then the model; ``--model default``: the shipped model, or no
network where none ships; ``--model none``: no network, the map optimised on each pair), in one
pass and, as asked, with ``--passes``, ``--io-steps`` and ``--io-field-steps`` (a row each); with ``--no-network`` also
without a network (``--model none``), in the same run. Columns: Dice over ``brain/eval_labels.txt`` (warped moving
aseg, nearest neighbour, against the fixed aseg), HD95 (mm), % of brain voxels (fixed aseg > 0) with
det J <= 0, SDlogJ there, seconds per pair (the command's wall time, files in and out), peak memory of
the command (RSS). A figure of the first pair: fixed, moving, after affine, after the model.
ITK (in ANTs and SimpleITK) and torch run on one thread each, as cyclereg's affine stage does.

    python benchmarks/real_brains.py [--syn] [--pairs N] [--model MODEL|default [--passes N] [--io-steps N] [--io-field-steps N]] [--no-network]
    python benchmarks/real_brains.py --shell 3     # one pair from the shell, as a user runs it, every core

The held-out subjects (``HELD_OUT``) are kept out of all training (issue 19 uses the same ones).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # inherited by every command run here
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SHARED, append_report  # noqa: E402

HELD_OUT = ("fs01", "fs02", "niivue")  # labelled, two sources (adni_like's aseg does not lie on its scan: half its labels fall outside the brain)
BRAINS = SHARED / "brains"


def eval_labels() -> list[int]:
    return [int(v) for v in (SHARED / "brain" / "eval_labels.txt").read_text().split()]


def pairs_csv(path: Path, affines: dict | None = None) -> Path:
    """Every directed held-out pair as a pairs CSV for ``cyclereg evaluate`` at ``path``: the scans and their
    asegs, and with ``affines`` ((fixed, moving) names -> transform file) a column ``affine``."""
    rows = [[BRAINS / f"{f}_t1.nii.gz", BRAINS / f"{m}_t1.nii.gz", BRAINS / f"{f}_aseg.nii.gz", BRAINS / f"{m}_aseg.nii.gz",
             *([affines[f, m]] if affines else [])] for f, m in itertools.permutations(HELD_OUT, 2)]
    header = "fixed,moving,fixed_labels,moving_labels" + (",affine" if affines else "")
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n")
    return path


_WRAP = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def _run(argv, env=None, stderr: list | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a command, run under a fresh wrapper process so that the peak
    is that command's alone; its stderr lines are added to ``stderr`` if given."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAP, *map(str, argv)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed: {done.stderr.strip()[-500:]}")
    if stderr is not None:
        stderr.extend(done.stderr.strip().splitlines()[:-1])
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 2**20


def _shell(repeats: int) -> None:
    """The issue's command from the shell, as a user runs it: ``cyclereg register`` without ``--model`` on
    fs02 -> fs01 (256³, 1 mm), warped image and ``.h5`` transform written, every core of this machine,
    a fresh process each time (imports included), writing new files (the last run's are flushed to disk and
    removed first, untimed, so that no run pays for the one before). Records the median wall time and the
    peak memory."""
    threads = str(os.cpu_count())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads}
    seconds, peaks, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for old in Path(tmp).iterdir():
                old.unlink()
            os.sync()
            wall, peak = _run([sys.executable, "-m", "cyclereg", "register", "--fixed", BRAINS / "fs01_t1.nii.gz",
                               "--moving", BRAINS / "fs02_t1.nii.gz", "--warped", Path(tmp) / "w.nii.gz",
                               "--transform", Path(tmp) / "t.h5"], env=env, stderr=notes)
            seconds.append(wall)
            peaks.append(peak)
            print(f"shell: {wall:.1f} s, {peak:.2f} GiB", flush=True)
    default = "no network (no model ships)" if any("without a network" in n for n in notes) else "the shipped model"
    body = (f"`cyclereg register --fixed fs01_t1.nii.gz --moving fs02_t1.nii.gz --warped w.nii.gz --transform t.h5` "
            f"(256³, 1 mm; no --model: {default}), {threads} threads, a fresh process each time, imports included, "
            "new files each time. "
            f"Median of {repeats}: **{np.median(seconds):.1f} s** wall (all: {', '.join(f'{t:.1f}' for t in seconds)}), "
            f"peak memory {max(peaks):.2f} GiB.")
    print(body)
    import torch

    torch.set_num_threads(int(threads))  # the report's header names the threads the command ran with
    append_report("Real brains: one pair from the shell (benchmarks/real_brains.py --shell)", body)


def _scores(fixed_aseg: sitk.Image, warped_aseg: sitk.Image, det: float | np.ndarray, labels) -> dict:
    from cyclereg.core.label_metrics import hd95, log_jacobian_std

    a, b = sitk.GetArrayFromImage(warped_aseg), sitk.GetArrayFromImage(fixed_aseg)
    present = [lab for lab in labels if (b == lab).any()]
    dice = [2 * np.count_nonzero((a == lab) & (b == lab)) / max(1, np.count_nonzero(a == lab) + np.count_nonzero(b == lab))
            for lab in present]
    spacing = tuple(reversed(fixed_aseg.GetSpacing()))
    dist = hd95(a, b, present, spacing)
    brain = b > 0
    det = np.broadcast_to(np.asarray(det, dtype=np.float64), brain.shape)[brain]
    return {"dice": float(np.mean(dice)), "hd95": float(np.mean(dist[np.isfinite(dist)])),
            "folded": float(100 * np.count_nonzero(det <= 0) / det.size), "sdlogj": log_jacobian_std(det)}


def _cyclereg_affine(fixed: Path, moving: Path, out: Path, similarity: str):
    seconds, peak = _run([sys.executable, "-m", "cyclereg", "affine", "--fixed", fixed, "--moving", moving,
                          "--transform", out / "affine.tfm", "--warped", out / "warped.nii.gz", "--similarity", similarity])
    transform = sitk.ReadTransform(str(out / "affine.tfm"))
    det = float(np.linalg.det(np.array(sitk.AffineTransform(transform).GetMatrix()).reshape(3, 3)))
    return transform, det, seconds, peak


def _ants(fixed: Path, moving: Path, out: Path, kind: str):
    script = f"""
import ants, SimpleITK as sitk
f, m = ants.image_read({str(fixed)!r}), ants.image_read({str(moving)!r})
r = ants.registration(f, m, type_of_transform={kind!r})
ants.image_write(r["warpedmovout"], {str(out / 'warped.nii.gz')!r})
if {kind!r} != "Affine":
    ants.image_write(ants.create_jacobian_determinant_image(f, r["fwdtransforms"][0]), {str(out / 'jacobian.nii.gz')!r})
import json; json.dump(r["fwdtransforms"], open({str(out / 'transforms.json')!r}, "w"))
"""
    seconds, peak = _run([sys.executable, "-c", script])
    transforms = json.loads((out / "transforms.json").read_text())
    affine = sitk.AffineTransform(sitk.ReadTransform(transforms[-1]))  # ANTs' .mat: an ITK affine transform
    det = float(np.linalg.det(np.array(affine.GetMatrix()).reshape(3, 3)))  # constant; SyN: times its warp's
    if kind != "Affine":
        det = det * sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    return transforms, det, seconds, peak


def _cyclereg_model(fixed: Path, moving: Path, moving_aseg: Path, out: Path, model: Path | None, options: list):
    """``cyclereg register`` with ``model`` (None: the shipped default) and extra ``options``."""
    chosen = [] if model is None else ["--model", model]
    seconds, peak = _run([sys.executable, "-m", "cyclereg", "register", *chosen, "--fixed", fixed, "--moving", moving,
                          "--moving-labels", moving_aseg, "--warped-labels", out / "warped_aseg.nii.gz",
                          "--warped", out / "warped.nii.gz", "--jacobian", out / "jacobian.nii.gz", *options])
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))  # the whole map's, affine included
    return sitk.ReadImage(str(out / "warped_aseg.nii.gz")), det, seconds, peak


def _model_rows(args) -> dict:
    """Row name -> ``(model, register options)`` for the model rows asked for (model None: no ``--model``)."""
    rows = {}
    if args.model:
        from cyclereg.models.shipped import default_model

        default = "shipped model" if default_model() is not None else "no --model (none ships: no network, map optimised)"
        name = {"default": default, "none": "no network (map optimised)"}.get(str(args.model), args.model.name)
        model = None if args.model == Path("default") else args.model
        rows[f"cyclereg affine + {name}"] = (model, [])
        if args.passes > 1:
            rows[f"cyclereg affine + {name}, {args.passes} passes"] = (model, ["--passes", args.passes])
        if args.io_steps:
            rows[f"cyclereg affine + {name}, --io-steps {args.io_steps}"] = (model, ["--io-steps", args.io_steps])
        if args.io_field_steps is not None:  # 0 too: the row without the map refinement a model may do by default
            refine = ["--io-field-steps", args.io_field_steps] + (["--io-field-downsample", args.io_field_downsample]
                                                                 if args.io_field_downsample else [])
            rows[f"cyclereg affine + {name}, {' '.join(map(str, refine))}"] = (model, refine)
    if args.no_network and args.model != Path("none"):
        rows["cyclereg affine + no network (--model none, map optimised)"] = (Path("none"), [])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--syn", action="store_true", help="also ANTs SyN (about two minutes a pair)")
    p.add_argument("--pairs", type=int, default=None, help="only the first N directed pairs")
    p.add_argument("--model", type=Path, default=None, help="also cyclereg register with this model file "
                   "('default': no --model, the shipped model; 'none': without a network)")
    p.add_argument("--passes", type=int, default=1, help="--model: also a row with this many --passes")
    p.add_argument("--io-steps", type=int, default=0, help="--model: also a row with this many --io-steps")
    p.add_argument("--io-field-steps", type=int, default=None, help="--model: also a row with this many --io-field-steps "
                   "(0: a row without the field refinement that a model may do by default)")
    p.add_argument("--io-field-downsample", type=int, default=0, help="--io-field-steps: with this --io-field-downsample")
    p.add_argument("--no-network", action="store_true", help="also a row without a network (--model none)")
    p.add_argument("--shell", type=int, default=0, metavar="N", help="instead: time the issue's command on one pair "
                   "from the shell N times, with every core (the default model, files in and out)")
    args = p.parse_args()
    if args.shell:
        return _shell(args.shell)
    labels = eval_labels()
    pairs = list(itertools.permutations(HELD_OUT, 2))[: args.pairs]
    try:
        import ants
    except ImportError:
        ants = None
    have_ants = ants is not None
    methods = ["none", "cyclereg affine (NCC)", "cyclereg affine (MI)"]
    model_rows = _model_rows(args)
    methods += list(model_rows)
    if have_ants:
        methods[1:1] = ["ANTs Affine"] + (["ANTs SyN"] if args.syn else [])
    results = {m: [] for m in methods}
    figure = {}
    for fixed_name, moving_name in pairs:
        fixed, moving = BRAINS / f"{fixed_name}_t1.nii.gz", BRAINS / f"{moving_name}_t1.nii.gz"
        fixed_aseg, moving_aseg = (sitk.ReadImage(str(BRAINS / f"{n}_aseg.nii.gz")) for n in (fixed_name, moving_name))
        results["none"].append({**_scores(fixed_aseg, sitk.Resample(moving_aseg, fixed_aseg, sitk.Transform(),
                                                                       sitk.sitkNearestNeighbor, 0), 1.0, labels),
                                "seconds": 0.0, "peak": 0.0})
        for method in methods[1:]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                if method in model_rows:
                    warped_aseg, det, seconds, peak = _cyclereg_model(fixed, moving, BRAINS / f"{moving_name}_aseg.nii.gz", out,
                                                                      *model_rows[method])
                elif method.startswith("cyclereg"):
                    transform, det, seconds, peak = _cyclereg_affine(fixed, moving, out, "mi" if "MI" in method else "ncc")
                    warped_aseg = sitk.Resample(moving_aseg, fixed_aseg, transform, sitk.sitkNearestNeighbor, 0)
                else:
                    transforms, det, seconds, peak = _ants(fixed, moving, out, "Affine" if method == "ANTs Affine" else "SyN")
                    warped = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(BRAINS / f"{moving_name}_aseg.nii.gz")),
                                                   transforms, interpolator="nearestNeighbor")
                    ants.image_write(warped, str(out / "warped_aseg.nii.gz"))
                    warped_aseg = sitk.ReadImage(str(out / "warped_aseg.nii.gz"))
                if (fixed_name, moving_name) == pairs[0] and method.startswith("cyclereg") and "MI" not in method:
                    figure[method] = sitk.ReadImage(str(out / "warped.nii.gz"))
                results[method].append({**_scores(fixed_aseg, warped_aseg, det, labels), "seconds": seconds, "peak": peak})
            print(method, fixed_name, moving_name, results[method][-1], flush=True)
        if (fixed_name, moving_name) == pairs[0]:
            _figure(fixed, moving, figure, f"{moving_name} to {fixed_name}")
    rows = []
    references = {k: np.mean([r["seconds"] for r in results[k]]) for k in ("ANTs Affine", "ANTs SyN") if k in results}
    for method in methods:
        r = results[method]
        mean = {k: float(np.mean([x[k] for x in r])) for k in r[0]}
        ratios = [f"{references[k] / mean['seconds']:.1f}×" if k in references and mean["seconds"] > 0 else "–"
                  for k in ("ANTs Affine", "ANTs SyN")]
        rows.append(f"| {method} | {mean['dice']:.3f} | {mean['hd95']:.2f} | {mean['folded']:.3f} | {mean['sdlogj']:.3f} | "
                    f"{mean['seconds']:.1f} | {' | '.join(ratios)} | {mean['peak']:.2f} |")
    note = "" if have_ants else " antspyx was not installed: no ANTs rows in this run."
    body = (f"Held-out subjects {', '.join(HELD_OUT)}: {len(pairs)} directed pairs, whole 1 mm images, files in and out; "
            f"Dice over brain/eval_labels.txt; folds and SDlogJ over the fixed aseg's brain.{note} Figure of the first "
            "pair: `docs/real_brains_affine.png`. ITK and torch on one thread.\n\n| registration | Dice | HD95 (mm) | % det J ≤ 0 | "
            "SDlogJ | s/pair | speed-up over ANTs Affine | over ANTs SyN | peak memory (GiB) |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(body)
    title = "Real brains, inter-subject, in their own scanner spaces (benchmarks/real_brains.py)"
    append_report(title if have_ants else title + ", without ANTs", body)  # a run without ANTs keeps theirs in view


def _figure(fixed: Path, moving: Path, warped: dict, title: str) -> None:
    """Middle slices: fixed, moving (on the fixed grid, unregistered), and each cyclereg result in ``warped``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = sitk.ReadImage(str(fixed))
    m_on_f = sitk.Resample(sitk.ReadImage(str(moving)), f, sitk.Transform(), sitk.sitkLinear, 0)
    names = ["fixed", "moving (no registration)"] + [f"after {k}" for k in warped]
    images = [sitk.GetArrayFromImage(x) for x in (f, m_on_f, *warped.values())]
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.4))
    for ax, image, name in zip(axes, images, names):
        ax.imshow(image[image.shape[0] // 2], cmap="gray")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "real_brains_affine.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
