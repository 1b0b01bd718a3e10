"""The ``cyclereg`` command line. Heavy modules are imported inside each command.

Errors a user can fix are printed as one line, ``cyclereg: error: ...``, with exit code 2 for a bad
argument or config and 1 for bad data; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from cyclereg import __version__
from cyclereg.core.errors import CycleregError, Interrupted, UsageError


PASSES_HELP = ("run the model this many times, each pass on the moving image warped by the passes before; "
               "more accurate for one network call per pass (default: %(default)s)")


class _Parser(argparse.ArgumentParser):
    """argparse with errors in cyclereg's one-line form (exit code 2)."""

    def error(self, message):
        self.exit(2, f"cyclereg: error: {message} (see '{self.prog} --help')\n")


def _add_io_options(parser):
    """Instance optimisation per pair: the weights (``--io-*``), then the map (``--io-field-*``)."""
    from cyclereg.registration.tuning import NO_IO as d

    parser.add_argument("--io-steps", type=int, default=d.steps, help="instance optimisation: Adam steps on the model's "
                        "weights for each pair, on its training loss (default: %(default)s)")
    parser.add_argument("--io-lr", type=float, default=d.lr, help="instance optimisation learning rate (default: %(default)s)")
    parser.add_argument("--io-downsample", type=int, default=d.downsample, help="instance optimisation of the model's steps "
                        "downsampled by a multiple of this (1, 2 or 4), on the pair downsampled by it: far cheaper per "
                        "step; the finer steps run as trained (default: %(default)s)")
    parser.add_argument("--io-field-steps", type=int, default=d.field_steps, help="then refine the map itself: Adam steps "
                        "on a smooth residual field, box LNCC + diffusion (default: %(default)s)")
    parser.add_argument("--io-field-lr", type=float, default=d.field_lr, help="field refinement: first step in voxels, "
                        "decayed along a cosine (default: %(default)s)")
    parser.add_argument("--io-field-weight", type=float, default=d.field_weight,
                        help="field refinement: weight of the residual's diffusion ‖∇R‖² (default: %(default)s)")
    parser.add_argument("--io-field-downsample", type=int, default=d.field_downsample,
                        help="field refinement: the residual's grid is this many times coarser than the model grid "
                        "(default: %(default)s)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cyclereg", description="Unsupervised deformable image registration with inverse and cycle consistency.")
    p.add_argument("--version", action="version", version=f"cyclereg {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train on synthetic triangles & circles for a few minutes and show the result")
    demo.add_argument("--out", default="cyclereg-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")

    tr = sub.add_parser("train", help="train a model from a TOML config")
    tr.add_argument("config", help="config file (examples in configs/)")
    tr.add_argument("--out", required=True, help="output folder: model.safetensors, checkpoint.pt, log.jsonl")
    tr.add_argument("--steps", type=int, default=None, help="total training steps (stages are rescaled)")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. model.lam=512")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("evaluate", help="score a model on held-out pairs")
    ev.add_argument("--model", required=True)
    ev.add_argument("--dataset", choices=["mnist", "triangles"], default=None)
    ev.add_argument("--root", default=None, help="mnist: folder of the IDX files (default: the model's)")
    ev.add_argument("--split", choices=["train", "heldout", "test"], default="heldout",
                    help="mnist: 'heldout' (training file's images kept out of training; default), 'test' (t10k files) or 'train'")
    ev.add_argument("--digit", type=int, default=None, help="mnist digit (default: the model's)")
    ev.add_argument("--size", type=int, default=None, help="triangles: image size (default: the model's)")
    ev.add_argument("--pairs-csv", default=None, help="CSV with columns fixed, moving[, fixed_labels, moving_labels]")
    ev.add_argument("--labels", default=None, help="--pairs-csv: labels scored (a file with one per line, or 2,3,4; default: all in the fixed labels)")
    ev.add_argument("--per-pair", default=None, help="--pairs-csv: write the per-pair scores to this CSV")
    ev.add_argument("--pairs", type=int, default=100, help="number of random pairs (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0)
    _add_io_options(ev)
    ev.add_argument("--passes", type=int, default=1, help=PASSES_HELP)
    ev.add_argument("--json", default=None, help="write the summary here")
    ev.add_argument("--device", default=None)
    ev.add_argument("--compile", action="store_true", help="torch.compile the networks first (pays off over many pairs)")

    rg = sub.add_parser("register", help="register a moving image to a fixed image, or every pair of a CSV")
    rg.add_argument("--model", required=True)
    rg.add_argument("--fixed", help="fixed image (or use --pairs-csv)")
    rg.add_argument("--moving", help="moving image (or use --pairs-csv)")
    rg.add_argument("--pairs-csv", help="register every pair of this CSV (columns fixed, moving[, moving_labels, name]) "
                                         "with the model loaded once; outputs in --out-dir; under torchrun the pairs are "
                                         "split across processes")
    rg.add_argument("--out-dir", help="--pairs-csv: folder for NAME_warped.nii.gz, NAME_transform.h5, ...")
    rg.add_argument("--outputs", default="warped,transform",
                    help="--pairs-csv: which outputs, of warped,transform,jacobian,figure (default: %(default)s)")
    rg.add_argument("--warped", help="warped moving image (fixed image's grid)")
    rg.add_argument("--transform", help="ITK displacement-field transform (.h5, .tfm) or vector image (.nii.gz, .mha)")
    rg.add_argument("--moving-labels", help="label map of the moving image")
    rg.add_argument("--warped-labels", help="warped label map (nearest neighbour, same pixel type)")
    rg.add_argument("--jacobian", help="Jacobian determinant map")
    rg.add_argument("--figure", help="PNG of orthogonal slices: fixed, moving, warped, difference, deformed grid")
    _add_io_options(rg)
    rg.add_argument("--passes", type=int, default=1, help=PASSES_HELP)
    rg.add_argument("--patch", type=int, nargs="+", help="two-step models: run the second step on overlapping "
                    "patches of this many voxels of the model grid per axis (CycleMorph's multi-scale scheme)")
    rg.add_argument("--overlap", type=int, nargs="+", help="with --patch: overlap of the patches in voxels (default: a quarter of --patch)")
    rg.add_argument("--device", default=None)
    rg.add_argument("--compile", action="store_true", help="torch.compile the networks first (pays off over many pairs)")

    wp = sub.add_parser("warp", help="apply a saved transform to an image of the moving subject")
    wp.add_argument("--transform", required=True, help="transform written by register --transform")
    wp.add_argument("--moving", required=True, help="image to warp")
    wp.add_argument("--fixed", required=True, help="image whose grid the output takes")
    wp.add_argument("--out", required=True, help="warped image")
    wp.add_argument("--nearest", action="store_true", help="nearest-neighbour interpolation (label maps)")

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
    return p


def _load(args, device=None):
    """The model of ``--model`` on its device, compiled first with ``--compile`` (time on stderr)."""
    from cyclereg.models.methods import compile_networks
    from cyclereg.models.modelfile import load_model

    device = device or _device(args.device)
    model, info = load_model(args.model, device)
    if getattr(args, "compile", False):
        seconds = compile_networks(model, info.shape, device)
        print(f"cyclereg: torch.compile: {seconds:.1f} s to compile for {'x'.join(map(str, info.shape))} "
              "(other shapes compile on first use)", file=sys.stderr)
    return model, info


def _tuning(args):
    """The instance optimisation asked for by the ``--io-*`` options."""
    from cyclereg.registration.tuning import InstanceOptimisation

    return InstanceOptimisation(args.io_steps, args.io_lr, args.io_downsample, args.io_field_steps, args.io_field_lr,
                                args.io_field_weight, args.io_field_downsample)


def _passes(args, model):
    """The model run ``--passes`` times (:class:`cyclereg.methods.Passes`)."""
    from cyclereg.models.methods import Passes

    if args.passes < 1:
        raise UsageError(f"--passes: expected at least 1, got {args.passes}")
    return Passes(model, args.passes) if args.passes > 1 else model


def _patchwise(args, model, info):
    """The model run on patches by ``--patch``/``--overlap`` (:class:`cyclereg.multiscale.Patchwise`)."""
    if not args.patch:
        if args.overlap:
            raise UsageError("--overlap goes with --patch")
        return model
    from cyclereg.models.methods import forward_model
    from cyclereg.models.multiscale import Patchwise

    if args.io_steps:
        raise UsageError("--patch runs the model without gradients; it does not combine with --io-steps")
    if len(args.patch) != info.dim or min(args.patch) < 4:
        raise UsageError(f"--patch: expected {info.dim} sizes of at least 4 voxels, got {args.patch}")
    overlap = args.overlap or [p // 4 for p in args.patch]
    if len(overlap) != info.dim or any(not 0 <= o < p for o, p in zip(overlap, args.patch)):
        raise UsageError(f"--overlap: expected {info.dim} overlaps from 0 to below the patch sizes {args.patch}, got {overlap}")
    steps = len(forward_model(model).steps)
    if steps != 2:
        raise UsageError(f"--patch needs a model of two steps (global, local); {args.model} has {steps}")
    return Patchwise(model, args.patch, overlap)


def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda, got {name!r}") from None


def _cmd_train(args) -> int:
    from cyclereg.core.config import load_config
    from cyclereg.training.train import train

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    path = train(cfg, args.out, resume=args.resume, device=_device(args.device), progress=not args.quiet)
    print(f"model written to {path}")
    return 0


def _cmd_evaluate(args) -> int:
    from cyclereg.core.atomic import check_output, write_text

    if args.pairs < 1:
        raise UsageError(f"--pairs: expected at least 1, got {args.pairs}")
    tuning = _tuning(args)
    for name, out in (("--json", args.json), ("--per-pair", args.per_pair)):
        if out:
            check_output(out, name)
    if args.pairs_csv:
        from cyclereg.core import distributed
        from cyclereg.evaluation.files import evaluate_csv, parse_labels

        labels = parse_labels(args.labels)
        with distributed.session(_device(args.device)) as ctx:  # under torchrun: the pairs are split across processes
            model, info = _load(args, ctx.device)
            model = _passes(args, model)
            summary = evaluate_csv(model, info, args.pairs_csv, tuning=tuning,
                                   labels=labels, per_pair=args.per_pair, ctx=ctx)
        if summary is None:  # not rank 0: rank 0 reports
            return 0
    else:
        model, info = _load(args)
        summary = _evaluate_dataset(_passes(args, model), info, args, tuning)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        write_text(args.json, text + "\n")
    return 0


def _evaluate_dataset(model, info, args, tuning) -> dict:
    import dataclasses

    import torch

    from cyclereg.data.datasets import dataset_images, fixed_pairs
    from cyclereg.evaluation.scores import score_pairs, summarise
    from cyclereg.models.methods import settings_from_config
    from cyclereg.registration.refine import refine_as
    from cyclereg.registration.register import instance_optimisation

    data = info.config.data
    dataset = args.dataset or data.dataset
    if dataset == "mnist":
        data = dataclasses.replace(data, dataset="mnist", root=args.root or data.root,
                                   digit=data.digit if args.digit is None else args.digit)
        if not data.root:
            raise UsageError("--root: the folder of the MNIST IDX files is required")
        if data.digit not in range(10):
            raise UsageError(f"--digit: expected an integer from 0 to 9, got {data.digit}")
    else:
        data = dataclasses.replace(data, dataset="triangles", size=args.size or info.shape[-1])
    images = dataset_images(data, args.split if dataset == "mnist" else "test", n_test=2 * args.pairs)
    if tuple(images.shape[2:]) != tuple(info.shape):
        raise UsageError(f"the model registers images of shape {tuple(info.shape)}, the dataset has {tuple(images.shape[2:])}")
    moving, fixed = fixed_pairs(images, args.pairs, args.seed)

    def tuned_pair(m, f):
        with instance_optimisation(model, m, f, settings_from_config(info.config.model, info.config.final_lam()), tuning) as tuned, torch.no_grad():
            ab, ba = tuned(m, f), tuned(f, m)
        return refine_as(tuning, ab, m, f), refine_as(tuning, ba, f, m)

    register = tuned_pair if tuning.steps or tuning.field_steps else None
    batch = 1 if register else 64
    return summarise(score_pairs(model, moving, fixed, batch_size=batch, register=register), info.shape)


def _cmd_register(args) -> int:
    from cyclereg.registration.register import register_files

    if args.pairs_csv:
        return _register_csv(args)
    if not args.fixed or not args.moving:
        raise UsageError("register needs --fixed and --moving, or --pairs-csv with --out-dir")
    _check_outputs({"--warped": args.warped, "--transform": args.transform, "--warped-labels": args.warped_labels,
                    "--jacobian": args.jacobian, "--figure": args.figure})
    tuning = _tuning(args)
    model, info = _load(args)
    model = _passes(args, _patchwise(args, model, info))
    summary = register_files(model, info, args.fixed, args.moving, warped=args.warped, transform=args.transform,
                             jacobian=args.jacobian, moving_labels=args.moving_labels,
                             warped_labels=args.warped_labels, tuning=tuning, figure=args.figure)
    print(json.dumps(summary))
    return 0


def _register_csv(args) -> int:
    from cyclereg.core import distributed
    from cyclereg.registration.register import register_csv

    if args.fixed or args.moving or args.warped or args.transform or args.jacobian or args.figure:
        raise UsageError("--pairs-csv replaces --fixed, --moving and the single-pair outputs; use --out-dir and --outputs")
    if not args.out_dir:
        raise UsageError("--pairs-csv needs --out-dir")
    tuning = _tuning(args)
    # Under torchrun the pairs are split across processes; they never need to talk, so no process group.
    ctx = distributed.environment(_device(args.device))
    model, info = _load(args, ctx.device)
    model = _passes(args, _patchwise(args, model, info))
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    for summary in register_csv(model, info, args.pairs_csv, args.out_dir, outputs, tuning,
                                ctx.rank, ctx.world, progress=ctx.main):
        print(json.dumps(summary), flush=True)
    return 0


def _cmd_warp(args) -> int:
    from cyclereg.registration.register import warp_file

    _check_outputs({"--out": args.out})
    warp_file(args.transform, args.moving, args.fixed, args.out, nearest=args.nearest)
    print(f"warped image written to {args.out}")
    return 0


def _cmd_optimize(args) -> int:
    from cyclereg.models.methods import LossSettings
    from cyclereg.registration.optimize import optimize_pair
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.registration.register import Registration, model_inputs, read_pair, write_outputs

    if args.steps < 1:
        raise UsageError(f"--steps: expected at least 1, got {args.steps}")
    if args.lam < 0 or args.noise < 0 or args.lr <= 0:
        raise UsageError("--lambda and --noise must be >= 0 and --lr > 0")
    _check_outputs({"--warped": args.warped, "--transform": args.transform, "--jacobian": args.jacobian})
    pair = read_pair(args.fixed, args.moving)
    device = _device(args.device)
    grid, m, f = model_inputs(pair, Preprocessing())  # the fixed image's own grid, intensities in [0, 1]
    settings = LossSettings(args.method, args.similarity, args.lam, args.noise)
    phi_ab, _, history = optimize_pair(m.to(device), f.to(device), settings, steps=args.steps, lr=args.lr, progress=True)
    summary = write_outputs(Registration(pair, grid, phi_ab), device, warped=args.warped, transform=args.transform,
                            jacobian=args.jacobian)
    summary.update(loss_first=history[0], loss_last=history[-1])
    print(json.dumps(summary))
    return 0


def _check_outputs(outputs: dict) -> None:
    """``outputs``: option -> path (or None). At least one is needed, each in a writable folder."""
    from cyclereg.core.atomic import check_output

    if not any(outputs.values()):
        raise UsageError(f"name at least one output ({', '.join(outputs)})")
    for option, out in outputs.items():
        if out:
            check_output(out, option)


def _cmd_demo(args) -> int:
    from cyclereg.cli.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "evaluate": _cmd_evaluate, "register": _cmd_register,
            "optimize": _cmd_optimize, "warp": _cmd_warp}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CycleregError as err:
        if args.debug:
            raise
        print(f"cyclereg: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as stop:
        print(f"cyclereg: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("cyclereg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
