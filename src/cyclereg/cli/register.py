"""``cyclereg register`` (one pair, or every pair of a CSV) and ``cyclereg warp`` (a saved transform applied)."""

from __future__ import annotations

import json

from cyclereg.cli.common import (MODEL_HELP, PASSES_HELP, add_affine_options, add_series_option, add_io_options, check_outputs, csv_affine, device_of, load, passes,
                                 patchwise, tuning_of)
from cyclereg.core.errors import UsageError


def add(sub) -> None:
    rg = sub.add_parser("register", help="register a moving image to a fixed image, or every pair of a CSV")
    rg.add_argument("--model", help=MODEL_HELP)
    rg.add_argument("--fixed", help="fixed image (or use --pairs-csv)")
    rg.add_argument("--moving", help="moving image (or use --pairs-csv)")
    rg.add_argument("--pairs-csv", help="register every pair of this CSV (columns fixed, moving[, moving_labels, name]) "
                                         "with the model loaded once; outputs in --out-dir; under torchrun the pairs are "
                                         "split across processes")
    rg.add_argument("--out-dir", help="--pairs-csv: folder for NAME_warped.nii.gz, NAME_transform.h5, ... (created if "
                    "missing); a rerun skips the pairs whose outputs are all there")
    rg.add_argument("--overwrite", action="store_true", help="--pairs-csv: register every pair again, even those done")
    rg.add_argument("--outputs", default="warped,transform",
                    help="--pairs-csv: which outputs, of warped,transform,transform_inverse,jacobian,figure (default: %(default)s)")
    rg.add_argument("--warped", help="warped moving image (fixed image's grid)")
    rg.add_argument("--transform", help="the whole map, fixed points to moving points: an ITK transform file (.h5, .tfm; "
                    "a composite of the affine and the displacement field) or one displacement field, the affine folded in "
                    "(.nii.gz, .mha)")
    rg.add_argument("--transform-inverse", help="the inverse map (moving points to fixed points), as --transform")
    rg.add_argument("--moving-labels", help="label map of the moving image")
    rg.add_argument("--warped-labels", help="warped label map (nearest neighbour, same pixel type)")
    rg.add_argument("--jacobian", help="Jacobian determinant map")
    rg.add_argument("--figure", help="PNG of orthogonal slices: fixed, moving, warped, difference, deformed grid")
    add_affine_options(rg)
    add_io_options(rg)
    rg.add_argument("--passes", type=int, default=1, help=PASSES_HELP)
    rg.add_argument("--patch", type=int, nargs="+", help="two-step models: run the second step on overlapping "
                    "patches of this many voxels of the model grid per axis (CycleMorph's multi-scale scheme)")
    rg.add_argument("--overlap", type=int, nargs="+", help="with --patch: overlap of the patches in voxels (default: a quarter of --patch)")
    rg.add_argument("--device", default=None)
    rg.add_argument("--compile", action="store_true", help="torch.compile the networks first (pays off over many pairs)")

    add_series_option(rg)

    rg.set_defaults(run=run)

    wp = sub.add_parser("warp", help="apply a saved transform to an image of the moving subject")
    wp.add_argument("--transform", required=True, help="transform written by register --transform or --transform-inverse "
                    "(a transform file or a displacement field image), or any ITK transform")
    wp.add_argument("--moving", required=True, help="image to warp")
    wp.add_argument("--fixed", required=True, help="image whose grid the output takes")
    wp.add_argument("--out", required=True, help="warped image")
    wp.add_argument("--nearest", action="store_true", help="nearest-neighbour interpolation (label maps)")

    add_series_option(wp)

    wp.set_defaults(run=run_warp)


def run(args) -> int:
    from cyclereg.registration.register import register_files

    if args.pairs_csv:
        return register_pairs_csv(args)
    if not args.fixed or not args.moving:
        raise UsageError("register needs --fixed and --moving, or --pairs-csv with --out-dir")
    check_outputs({"--warped": args.warped, "--transform": args.transform, "--transform-inverse": args.transform_inverse,
                   "--warped-labels": args.warped_labels, "--jacobian": args.jacobian, "--figure": args.figure})
    device = device_of(args.device)
    model, info = load(args, device)
    tuning = tuning_of(args, info, networkfree=model is None)
    model = passes(args, patchwise(args, model, info))
    summary = register_files(model, info, args.fixed, args.moving, warped=args.warped, transform=args.transform,
                             jacobian=args.jacobian, moving_labels=args.moving_labels,
                             warped_labels=args.warped_labels, tuning=tuning, figure=args.figure,
                             transform_inverse=args.transform_inverse, affine=args.affine,
                             affine_similarity=args.affine_similarity, device=device)
    print(json.dumps(summary))
    return 0


def register_pairs_csv(args) -> int:
    from cyclereg.core import distributed
    from cyclereg.registration.batch import register_csv

    if args.fixed or args.moving or args.warped or args.transform or args.transform_inverse or args.jacobian or args.figure:
        raise UsageError("--pairs-csv replaces --fixed, --moving and the single-pair outputs; use --out-dir and --outputs")
    if not args.out_dir:
        raise UsageError("--pairs-csv needs --out-dir")
    affine = csv_affine(args)
    # Under torchrun the pairs are split across processes; they never need to talk, so no process group.
    ctx = distributed.environment(device_of(args.device))
    model, info = load(args, ctx.device)
    tuning = tuning_of(args, info, networkfree=model is None)
    model = passes(args, patchwise(args, model, info))
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    for summary in register_csv(model, info, args.pairs_csv, args.out_dir, outputs, tuning,
                                ctx.rank, ctx.world, progress=ctx.main, affine=affine,
                                affine_similarity=args.affine_similarity, overwrite=args.overwrite,
                                device=ctx.device):
        print(json.dumps(summary), flush=True)
    return 0


def run_warp(args) -> int:
    from cyclereg.registration.register import warp_file

    check_outputs({"--out": args.out})
    warp_file(args.transform, args.moving, args.fixed, args.out, nearest=args.nearest)
    print(f"warped image written to {args.out}")
    return 0
