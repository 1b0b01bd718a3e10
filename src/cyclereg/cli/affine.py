"""``cyclereg affine``: affine registration of a pair of scans in physical space, an ITK transform out."""

from __future__ import annotations

import json
import sys
import time

from cyclereg.cli.common import add_series_option, check_outputs, device_of
from cyclereg.core.errors import UsageError


def add(sub) -> None:
    af = sub.add_parser("affine", help="align a moving image to a fixed image affinely (translation, rigid, affine)")
    af.add_argument("--fixed", required=True, help="fixed image")
    af.add_argument("--moving", required=True, help="moving image")
    af.add_argument("--transform", required=True, help="ITK affine transform out (.tfm, .txt, .h5): fixed points to moving points")
    af.add_argument("--warped", help="the moving image resampled onto the fixed image's grid with it")
    af.add_argument("--similarity", choices=["ncc", "mi"], default="ncc",
                    help="ncc for one contrast, mi (mutual information) for two (default: %(default)s)")
    af.add_argument("--steps", type=int, default=None, help="Adam steps per stage and resolution "
                    "(default: cyclereg.registration.affine.STEPS, 30)")
    af.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_series_option(af)
    af.set_defaults(run=run)


def run(args) -> int:
    import SimpleITK as sitk

    from cyclereg.core.atomic import all_or_nothing
    from cyclereg.io.transforms import write_transform
    from cyclereg.io.images import read_image, save_image
    from cyclereg.registration.affine import STEPS, affine_register

    args.steps = STEPS if args.steps is None else args.steps
    if args.steps < 1:
        raise UsageError(f"--steps: expected at least 1, got {args.steps}")
    check_outputs({"--transform": args.transform, "--warped": args.warped})
    fixed, moving = read_image(args.fixed, "--fixed"), read_image(args.moving, "--moving")
    t0 = time.perf_counter()
    result = affine_register(fixed, moving, args.similarity, steps=args.steps, device=device_of(args.device),
                             names=(f"--fixed {args.fixed}", f"--moving {args.moving}"))
    seconds = time.perf_counter() - t0
    if result.kept_start:
        print(f"cyclereg: affine: the optimisation ended worse ({args.similarity} cost {result.cost:.4g} on the finest "
              "grid) than where it started; the start is kept", file=sys.stderr)
    transform = result.transform()
    with all_or_nothing():
        write_transform(args.transform, transform)
        if args.warped:
            save_image(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, moving.GetPixelID()), args.warped)
    print(json.dumps({**result.summary(), "seconds": seconds}))
    return 0
