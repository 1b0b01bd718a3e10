"""What the commands share: options, loading a model, the device, instance optimisation and passes."""

from __future__ import annotations

import sys

from cyclereg.core.errors import UsageError

MODEL_HELP = ("a model file, or none: no network, the map optimised on each pair after the affine stage (default: the "
              "model that ships with cyclereg, 3D brain T1, listed by `cyclereg models`; none where no model ships)")
PASSES_HELP = ("run the model this many times, each pass on the moving image warped by the passes before; "
               "more accurate for one network call per pass (default: %(default)s)")


def add_io_options(parser):
    """Instance optimisation per pair: the weights (``--io-*``), then the map (``--io-field-*``). The defaults
    are a model's own where its file holds them (a shipped model's, ``cyclereg models``), else those of
    :data:`~cyclereg.registration.tuning.NO_IO`, or with ``--model none`` those of
    :data:`~cyclereg.registration.tuning.NETWORK_FREE`; :func:`tuning_of` fills in the ones not given."""
    from cyclereg.registration.tuning import NETWORK_FREE as free, NO_IO as d

    def default(name):
        a, b = getattr(d, name), getattr(free, name)
        return f"(default: {a}, or the model's own: cyclereg models" + (f"; with --model none: {b})" if a != b else ")")

    parser.add_argument("--io-steps", type=int, help="instance optimisation: Adam steps on the model's "
                        f"weights for each pair, on its training loss {default('steps')}")
    parser.add_argument("--io-lr", type=float, help=f"instance optimisation learning rate {default('lr')}")
    parser.add_argument("--io-downsample", type=int, help="instance optimisation of the model's steps "
                        "downsampled by a multiple of this (1, 2 or 4), on the pair downsampled by it: far cheaper per "
                        f"step; the finer steps run as trained {default('downsample')}")
    parser.add_argument("--io-field-steps", type=int, help="then refine the map itself: Adam steps "
                        f"on a smooth residual field, box LNCC + diffusion {default('field_steps')}")
    parser.add_argument("--io-field-lr", type=float, help="field refinement: first step in voxels, "
                        f"decayed along a cosine {default('field_lr')}")
    parser.add_argument("--io-field-weight", type=float,
                        help=f"field refinement: weight of the residual's diffusion ‖∇R‖² {default('field_weight')}")
    parser.add_argument("--io-field-downsample", type=int,
                        help="field refinement: the residual's grid is this many times coarser than the model grid "
                        f"{default('field_downsample')}")


def add_series_option(parser) -> None:
    """``--series UID``: which series to read from a DICOM folder that holds several."""
    parser.add_argument("--series", action="append", default=[], metavar="UID",
                        help="read this series of a DICOM folder that holds several (its SeriesInstanceUID; "
                        "repeat for the fixed and the moving image)")


def add_affine_options(parser, pairs_csv: bool = True) -> None:
    """The affine stage that runs before the model (:func:`cyclereg.registration.register.align`)."""
    extra = "; with --pairs-csv, auto or none, and a column 'affine' names a file per pair" if pairs_csv else ""
    parser.add_argument("--affine", default="auto", help="affine pre-alignment first: auto (find it), none (the images "
                        f"are aligned already), or an ITK affine transform file, fixed points to moving points{extra} "
                        "(default: %(default)s)")
    parser.add_argument("--affine-similarity", choices=["ncc", "mi"], default="ncc",
                        help="--affine auto: ncc for one contrast, mi (mutual information) for two (default: %(default)s)")


def csv_affine(args) -> str:
    """``--affine`` for a pairs CSV: one mode for every pair (files go in the CSV's column)."""
    if args.affine not in ("auto", "none"):
        raise UsageError(f"--affine {args.affine}: with --pairs-csv, expected auto or none; name a transform file "
                         "per pair in a column 'affine' of the CSV")
    return args.affine


def load(args, device=None):
    """The model of ``--model`` on its device, compiled first with ``--compile`` (time on stderr); without
    ``--model``, the shipped default, or, where none ships, no network (a note on stderr). ``--model none``
    gives ``(None, None)``: registration without a network (:mod:`cyclereg.registration.networkfree`)."""
    from cyclereg.models.registration import compile_networks
    from cyclereg.models.modelfile import load_model
    from cyclereg.models.shipped import default_model
    from cyclereg.registration.networkfree import NO_NETWORK

    device = device or device_of(args.device)
    if args.model is None:
        shipped = default_model()
        if shipped is not None:
            args.model = str(shipped)
        else:
            print(f"cyclereg: no --model given and no default model ships with this cyclereg; registering without "
                  f"a network (--model {NO_NETWORK}: the affine stage, then the map optimised on this pair)", file=sys.stderr)
            args.model = NO_NETWORK
    if args.model == NO_NETWORK:
        if getattr(args, "compile", False):
            raise UsageError(f"--compile compiles a network; --model {NO_NETWORK} has none")
        return None, None
    model, info = load_model(args.model, device)
    if getattr(args, "compile", False):
        seconds = compile_networks(model, info.shape, device)
        print(f"cyclereg: torch.compile: {seconds:.1f} s to compile for {'x'.join(map(str, info.shape))} "
              "(other shapes compile on first use)", file=sys.stderr)
    return model, info


def tuning_of(args, info=None, networkfree: bool = False):
    """The instance optimisation asked for by the ``--io-*`` options; those not given take the defaults of
    the model of ``info`` (its own where its file has them), or with ``networkfree`` (``--model none``) those of
    registration without a network."""
    import dataclasses

    from cyclereg.registration.tuning import InstanceOptimisation, settings

    return settings({f.name: getattr(args, f"io_{f.name}") for f in dataclasses.fields(InstanceOptimisation)}, info, networkfree)


def passes(args, model):
    """The model run ``--passes`` times (:class:`cyclereg.models.registration.Passes`)."""
    from cyclereg.models.registration import Passes

    if args.passes < 1:
        raise UsageError(f"--passes: expected at least 1, got {args.passes}")
    if model is None and args.passes > 1:
        raise UsageError("--passes runs a network several times; --model none has none")
    return Passes(model, args.passes) if args.passes > 1 else model


def patchwise(args, model, info):
    """The model run on patches by ``--patch``/``--overlap`` (:class:`cyclereg.models.multiscale.Patchwise`)."""
    if not args.patch:
        if args.overlap:
            raise UsageError("--overlap goes with --patch")
        return model
    if model is None:
        raise UsageError("--patch runs a network on patches; --model none has none")
    from cyclereg.models.registration import forward_model
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


def device_of(name):
    import torch

    from cyclereg.core.distributed import default_device

    if name is None:
        return default_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda, got {name!r}") from None


def check_outputs(outputs: dict) -> None:
    """``outputs``: option -> path (or None). At least one is needed, each in a writable folder."""
    from cyclereg.core.atomic import check_output

    if not any(outputs.values()):
        raise UsageError(f"name at least one output ({', '.join(outputs)})")
    for option, out in outputs.items():
        if out:
            check_output(out, option)
