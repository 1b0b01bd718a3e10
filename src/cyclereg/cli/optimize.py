"""``cyclereg optimize``: direct optimisation of one pair's two displacement fields, without a network."""

from __future__ import annotations

import json

from cyclereg.cli.common import add_series_option, check_outputs, device_of
from cyclereg.core.errors import UsageError


def add(sub) -> None:
    op = sub.add_parser("optimize", help="direct optimisation of one pair's displacement fields, without a network")
    op.add_argument("--fixed", required=True)
    op.add_argument("--moving", required=True)
    op.add_argument("--method", choices=["icon", "gradicon", "diffusion"], default="icon")
    op.add_argument("--lambda", dest="lam", type=float, default=2048.0, help="regulariser weight (default: %(default)s)")
    op.add_argument("--noise", type=float, default=0.0, help="icon: map noise ε in voxels (ICON §2.3)")
    op.add_argument("--similarity", choices=["mse", "ncc", "lncc"], default="mse")
    op.add_argument("--steps", type=int, default=500)
    op.add_argument("--lr", type=float, default=0.3, help="Adam's first step in voxels, decayed along a cosine (default: %(default)s)")
    op.add_argument("--warped")
    op.add_argument("--transform")
    op.add_argument("--jacobian")
    op.add_argument("--device", default=None)
    add_series_option(op)
    op.set_defaults(run=run)


def run(args) -> int:
    from cyclereg.models.methods import LossSettings
    from cyclereg.registration.optimize import optimize_pair
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.registration.register import Registration, model_inputs, read_pair, write_outputs

    if args.steps < 1:
        raise UsageError(f"--steps: expected at least 1, got {args.steps}")
    if args.lam < 0 or args.noise < 0 or args.lr <= 0:
        raise UsageError("--lambda and --noise must be >= 0 and --lr > 0")
    check_outputs({"--warped": args.warped, "--transform": args.transform, "--jacobian": args.jacobian})
    pair = read_pair(args.fixed, args.moving)
    device = device_of(args.device)
    grid, m, f = model_inputs(pair, Preprocessing())  # the fixed image's own grid, intensities in [0, 1]
    settings = LossSettings(args.method, args.similarity, args.lam, args.noise)
    phi_ab, _, history = optimize_pair(m.to(device), f.to(device), settings, steps=args.steps, lr=args.lr, progress=True)
    summary = write_outputs(Registration(pair, grid, phi_ab), device, warped=args.warped, transform=args.transform,
                            jacobian=args.jacobian)
    summary.update(loss_first=history[0], loss_last=history[-1])
    print(json.dumps(summary))
    return 0
