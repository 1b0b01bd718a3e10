"""3D brain MRI benchmark (issue 4): cyclereg against ANTs SyN and SimpleITK's diffeomorphic demons on
the same synthetic held-out pairs, side by side in one run.

Pairs are made from ``../shared/data/brain/subject_a`` on an evaluation grid (``--spacing`` mm): each
image of a pair is the scan warped by its own random smooth diffeomorphism (``cyclereg.data.augment``, seeds
never used in training) with random intensity changes, so the true map between them is known. Scores:
Dice of the warped moving segmentation over ``eval_labels.txt``, error against the true field in mm
(mean over the brain, fixed labels > 0), percentage of voxels with det J <= 0, seconds per pair.
Pairs, warped labels and fields all go through the files users would have (NIfTI in, ITK fields out).

Needs the reference venv (antspyx): see benchmarks/requirements-reference.txt.

    .venv-bench/bin/python benchmarks/brain3d.py --model runs/brain3d_q/model.safetensors --spacing 4 --pairs 4
    .venv-bench/bin/python benchmarks/brain3d.py --model ... --full-res   # time of `cyclereg register` at 1 mm
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, append_report  # noqa: E402

from cyclereg.data.augment import random_deformation, random_intensity  # noqa: E402
from cyclereg.core.coords import identity_grid  # noqa: E402
from cyclereg.io.images import Geometry  # noqa: E402
from cyclereg.models.registration import Passes
from cyclereg.core.metrics import dice_labels, jacobian_determinant  # noqa: E402
from cyclereg.models.modelfile import load_model  # noqa: E402
from cyclereg.io.preprocess import Preprocessing, model_grid, prepare, resample  # noqa: E402
from cyclereg.registration.fixed_grid import on_fixed_grid  # noqa: E402
from cyclereg.registration.register import Pair, register_pair, sample_like_itk  # noqa: E402
from cyclereg.core.transforms import warp  # noqa: E402
from cyclereg.registration.tuning import NO_IO, InstanceOptimisation  # noqa: E402

BRAIN = SHARED / "brain"


def _image(array: torch.Tensor, grid: Geometry, pixel=sitk.sitkFloat32) -> sitk.Image:
    image = sitk.GetImageFromArray(array.detach().cpu().numpy())
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return sitk.Cast(image, pixel)


def make_pairs(spacing: float, n: int, deform: float, folder: Path):
    """``n`` held-out pairs on the evaluation grid, written as NIfTI; returns their descriptions."""
    t1 = sitk.ReadImage(str(BRAIN / "subject_a_t1.nii.gz"))
    aseg = sitk.ReadImage(str(BRAIN / "subject_a_aseg.nii.gz"))
    grid = model_grid(t1, Preprocessing(spacing=(spacing,) * 3))
    image = prepare(t1, grid, Preprocessing("none"))
    labels = torch.from_numpy(sitk.GetArrayFromImage(resample(aseg, grid, nearest=True)).astype(np.float32))[None, None]
    shape = tuple(reversed(grid.size))
    pairs = []
    for k in range(n):
        g = torch.Generator().manual_seed(10_000 + k)  # training draws from other generators
        psi_m, psi_m_inv = random_deformation(1, shape, deform, 5, g)
        psi_f, _ = random_deformation(1, shape, deform, 5, g)
        moving = random_intensity(warp(image, psi_m), g).clamp(0, None)
        fixed = random_intensity(warp(image, psi_f), g).clamp(0, None)
        truth = psi_m_inv @ psi_f
        paths = {name: folder / f"pair{k}_{name}.nii.gz" for name in ("fixed", "moving", "fixed_labels", "moving_labels")}
        sitk.WriteImage(_image(fixed[0, 0], grid), str(paths["fixed"]))
        sitk.WriteImage(_image(moving[0, 0], grid), str(paths["moving"]))
        sitk.WriteImage(_image(warp(labels, psi_f, mode="nearest")[0, 0], grid, sitk.sitkInt16), str(paths["fixed_labels"]))
        sitk.WriteImage(_image(warp(labels, psi_m, mode="nearest")[0, 0], grid, sitk.sitkInt16), str(paths["moving_labels"]))
        x = identity_grid(shape, dtype=torch.float64)
        true_disp = grid.to_physical(truth(x.float()).double()) - grid.to_physical(x)
        pairs.append({**paths, "truth": true_disp[0]})
    return grid, pairs


def score(pair: dict, displacement: torch.Tensor, eval_labels) -> dict:
    """Scores of a physical displacement field ``(3, *shape)`` on the fixed grid (ITK convention)."""
    fixed = sitk.ReadImage(str(pair["fixed"]))
    moving_labels_img = sitk.ReadImage(str(pair["moving_labels"]))
    g_fixed, g_moving = Geometry.of(fixed), Geometry.of(moving_labels_img)
    shape = tuple(reversed(g_fixed.size))
    x = g_fixed.to_physical(identity_grid(shape, dtype=torch.float64))
    y = x + displacement[None].double()
    moving_labels = torch.from_numpy(sitk.GetArrayFromImage(moving_labels_img).astype(np.float64))[None, None]
    warped = sample_like_itk(moving_labels, g_moving.from_physical(y), g_moving, nearest=True)[0, 0].round().long()
    fixed_labels = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(pair["fixed_labels"]))).astype(np.int64))
    present = [lab for lab in eval_labels if (fixed_labels == lab).any()]
    dice = dice_labels(warped[None], fixed_labels[None], present)[0]
    brain = fixed_labels > 0
    error = (displacement.double() - pair["truth"]).norm(dim=0)[brain]
    det = jacobian_determinant(g_fixed.from_physical(y))
    return {"dice": float(dice.nanmean()), "error_mm": float(error.mean()),
            "folded_percent": 100.0 * float((det <= 0).double().mean())}


def run_cyclereg(model, info, pair, tuning=NO_IO):
    fixed, moving = sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"]))
    t0 = time.perf_counter()
    reg = register_pair(model, info, Pair(fixed, moving), tuning)
    displacement = on_fixed_grid(reg).displacement[0]
    return displacement, time.perf_counter() - t0


def _from_sitk_field(field: sitk.Image) -> torch.Tensor:
    return torch.from_numpy(sitk.GetArrayFromImage(field)).movedim(-1, 0).double()


def run_reference(fn, pair):
    field, seconds = fn(sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"])))
    return _from_sitk_field(field), seconds


def ants_agreement(model, info, pair, folder: Path) -> float:
    """Max difference (fraction of the intensity range) between cyclereg's warped image and ANTs'
    ``apply_transforms`` with cyclereg's written displacement field (``.nii.gz``)."""
    import ants

    from cyclereg.registration.register import write_outputs

    reg = register_pair(model, info, Pair(sitk.ReadImage(str(pair["fixed"])), sitk.ReadImage(str(pair["moving"]))))
    write_outputs(reg, warped=folder / "ours.nii.gz", transform=folder / "field.nii.gz")
    fixed, moving = ants.image_read(str(pair["fixed"])), ants.image_read(str(pair["moving"]))
    theirs = ants.apply_transforms(fixed, moving, [str(folder / "field.nii.gz")], interpolator="linear").numpy()
    ours = ants.image_read(str(folder / "ours.nii.gz")).numpy()
    return float(np.abs(theirs - ours).max() / np.ptp(moving.numpy()))


def full_res_timing(model_path: Path) -> str:
    """`cyclereg register` from the shell on a 160x192x224 pair (files in and out): time and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t1 = sitk.ReadImage(str(BRAIN / "subject_a_t1.nii.gz"))
        image = prepare(t1, Geometry.of(t1), Preprocessing("none"))
        psi, _ = random_deformation(1, image.shape[2:], 4.0, 5, torch.Generator().manual_seed(20_000))
        moving = _image(warp(image, psi)[0, 0], Geometry.of(t1))
        sitk.WriteImage(moving, str(tmp / "moving.nii.gz"))
        cmd = [sys.executable, "-m", "cyclereg", "register", "--model", str(model_path), "--fixed", str(BRAIN / "subject_a_t1.nii.gz"),
               "--moving", str(tmp / "moving.nii.gz"), "--warped", str(tmp / "warped.nii.gz"),
               "--moving-labels", str(BRAIN / "subject_a_aseg.nii.gz"), "--warped-labels", str(tmp / "labels.nii.gz"),
               "--transform", str(tmp / "transform.nii.gz"), "--device", "cpu"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return (f"`cyclereg register` on a 160×192×224 pair at 1 mm (NIfTI in; warped image, warped labels and displacement "
            f"field out, as a subprocess): {seconds:.1f} s wall, peak memory {peak_gb:.2f} GB "
            f"(targets: < 15 s, < 6 GB).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a cyclereg model trained with configs/brain3d.toml")
    parser.add_argument("--spacing", type=float, default=2.0, help="evaluation grid spacing in mm (2: 80x96x112)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--deform", type=float, default=2.0, help="RMS of each image's random deformation, in evaluation voxels")
    parser.add_argument("--skip-syn", action="store_true")
    parser.add_argument("--passes", type=int, nargs="*", default=[], help="also cyclereg run this many passes (register --passes)")
    parser.add_argument("--io-steps", type=int, default=0, help="also cyclereg with instance optimisation of this many steps")
    parser.add_argument("--io-lr", type=float, default=5e-4)
    parser.add_argument("--io-downsample", type=int, default=1, help="instance optimisation of the steps downsampled "
                        "by a multiple of this, on the pair downsampled by it (register --io-downsample)")
    parser.add_argument("--io-field-steps", type=int, default=0, help="also cyclereg with this many steps of field "
                        "refinement (register --io-field-steps), alone and after the instance optimisation of --io-steps")
    parser.add_argument("--io-field-lr", type=float, default=NO_IO.field_lr)
    parser.add_argument("--io-field-weight", type=float, default=NO_IO.field_weight)
    parser.add_argument("--io-field-downsample", type=int, default=NO_IO.field_downsample)
    parser.add_argument("--full-res", action="store_true", help="also time `cyclereg register` at 160x192x224")
    parser.add_argument("--note", default="", help="a line added to the report (how the model was trained)")
    args = parser.parse_args()

    eval_labels = [int(v) for v in (BRAIN / "eval_labels.txt").read_text().split()]
    model, info = load_model(args.model)
    from reference_classical import demons_register, syn_register

    methods = {"cyclereg": lambda p: run_cyclereg(model, info, p)}
    for n in args.passes:
        methods[f"cyclereg, {n} passes"] = lambda p, n=n: run_cyclereg(Passes(model, n), info, p)
    io_passes = max(args.passes, default=1)  # instance optimisation runs with the most passes asked for
    runner = Passes(model, io_passes) if io_passes > 1 else model
    passes = f", {io_passes} passes" if io_passes > 1 else ""
    tuning = InstanceOptimisation(args.io_steps, args.io_lr, args.io_downsample)
    name = f"cyclereg + instance optimisation ({tuning.steps} steps, lr {tuning.lr:g}"
    name += f", --io-downsample {tuning.downsample})" if tuning.downsample > 1 else ")"
    if args.io_steps:
        methods[name + passes] = lambda p: run_cyclereg(runner, info, p, tuning)
    if args.io_field_steps:
        refined = replace(tuning, field_steps=args.io_field_steps, field_lr=args.io_field_lr,
                          field_weight=args.io_field_weight, field_downsample=args.io_field_downsample)
        field = (f"field refinement ({refined.field_steps} steps, lr {refined.field_lr:g} voxels, weight "
                 f"{refined.field_weight:g}, --io-field-downsample {refined.field_downsample})")
        methods[f"cyclereg + {field}{passes}"] = lambda p: run_cyclereg(runner, info, p, replace(refined, steps=0))
        if args.io_steps:
            methods[f"{name} + {field}{passes}"] = lambda p: run_cyclereg(runner, info, p, refined)
    methods["demons (SimpleITK)"] = lambda p: run_reference(demons_register, p)
    if not args.skip_syn:
        methods["SyN (antspyx)"] = lambda p: run_reference(syn_register, p)
    with tempfile.TemporaryDirectory() as tmp:
        grid, pairs = make_pairs(args.spacing, args.pairs, args.deform, Path(tmp))
        agreement = ants_agreement(model, info, pairs[0], Path(tmp))
        rows = {name: [] for name in ["identity", *methods]}
        for k, pair in enumerate(pairs):
            rows["identity"].append({**score(pair, torch.zeros_like(pair["truth"]), eval_labels), "seconds": 0.0})
            for name, fn in methods.items():
                displacement, seconds = fn(pair)
                rows[name].append({**score(pair, displacement, eval_labels), "seconds": seconds})
                print(f"pair {k} {name}: {rows[name][-1]}", flush=True)
    mean = {name: {key: float(np.mean([r[key] for r in rs])) for key in rs[0]} for name, rs in rows.items()}
    syn_seconds = mean.get("SyN (antspyx)", {}).get("seconds")
    lines = ["| method | Dice (eval labels) | error vs true field (mm) | % voxels det J ≤ 0 | seconds per pair | speed vs SyN |",
             "|---|---|---|---|---|---|"]
    for name, m in mean.items():
        speed = f"{syn_seconds / m['seconds']:.1f}×" if syn_seconds and m["seconds"] > 0 else "–"
        lines.append(f"| {name} | {m['dice']:.3f} | {m['error_mm']:.2f} | {m['folded_percent']:.3f} | {m['seconds']:.2f} | {speed} |")
    table = "\n".join(lines)
    print(table)
    body = (f"Held-out synthetic pairs from `subject_a` on a {'×'.join(map(str, reversed(grid.size)))} grid at "
            f"{args.spacing:g} mm ({args.pairs} pairs; each image warped by its own random diffeomorphism, RMS "
            f"{args.deform:g} voxels, seeds never used in training, plus random intensity changes). Model: "
            f"`{args.model}` (model grid spacing {info.preprocess.spacing} mm, shape {info.shape}). {args.note}\n\n{table}\n\n"
            f"ANTs `apply_transforms` with cyclereg's displacement field (`.nii.gz`) against cyclereg's warped image "
            f"(pair 0): max difference {agreement:.1e} of the intensity range.\n")
    if args.full_res:
        body += "\n" + full_res_timing(args.model)
        print(body.splitlines()[-1])
    append_report("3D brain MRI: cyclereg vs ANTs SyN and SimpleITK demons (issue 4)", body)


if __name__ == "__main__":
    main()
