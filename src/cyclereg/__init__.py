"""cyclereg: unsupervised deep deformable image registration with inverse and cycle consistency.

The Python API has the verbs of the command line::

    model = cyclereg.load_model("runs/brain/model.safetensors")
    result = cyclereg.register("fixed.nii.gz", "moving.nii.gz", model)   # paths or SimpleITK images
    result.warped, result.transform, result.jacobian                      # SimpleITK objects
    result.warp(labels, nearest=True); result.write(warped="w.nii.gz", transform="t.h5")
    cyclereg.evaluate(model, pairs_csv="pairs.csv")                       # the keys of docs/metrics.md
    cyclereg.register("fixed.nii.gz", "moving.nii.gz", "none")           # no network: the map optimised
    cyclereg.train("configs/mnist5.toml", out="runs/mnist5")

Registration runs without autograd (instance optimisation aside). The layers behind it, lowest first:
``core`` (coordinates: :mod:`cyclereg.core.coords`), ``io`` and ``losses``, ``models`` and ``data``,
``registration``, ``evaluation``, ``training``, ``cli``. Importing ``cyclereg`` loads none of them (nor torch).
"""

from __future__ import annotations

from typing import NamedTuple

from cyclereg.core.version import __version__
__all__ = ["__version__", "load_model", "register", "evaluate", "train", "Model", "Registration"]


class Model(NamedTuple):
    """A loaded model file: the network and its :class:`~cyclereg.models.modelfile.ModelInfo` (config,
    input shape, preprocessing, training summary). Unpacks as ``network, info``."""

    network: object
    info: object


def load_model(path, device=None) -> Model:
    """Load a model file (safetensors, no code runs) onto ``device`` (default: CUDA if available)."""
    from cyclereg.core.distributed import default_device
    from cyclereg.models.modelfile import load_model as read

    return Model(*read(path, device or default_device()))


def _as_model(model) -> Model:
    """A loaded model, a model file's path, ``"none"`` (no network: ``(None, None)``), or None: the model
    that ships with cyclereg, or no network where none ships (the CLI's ``--model``)."""
    from cyclereg.models.shipped import default_model
    from cyclereg.registration.networkfree import NO_NETWORK

    if model is None:
        model = default_model() or NO_NETWORK
    if isinstance(model, str) and model == NO_NETWORK:
        return Model(None, None)
    return model if isinstance(model, Model) else load_model(model)


def _runner(model, passes: int, options: dict):
    """``(network run passes times, info, tuning, device)`` for a model argument and the options of
    :func:`register` and :func:`evaluate`, checked; the network is None without one."""
    from cyclereg.core.errors import UsageError
    from cyclereg.models.registration import Passes
    from cyclereg.registration.register import device_for

    network, info = _as_model(model)
    tuning = _tuning(options, network, info)
    if passes < 1 or (network is None and passes > 1):
        raise UsageError(f"passes: expected at least 1 (1 without a network), got {passes}")
    return Passes(network, passes) if passes > 1 else network, info, tuning, device_for(network)


def _tuning(options: dict, network, info):
    """The instance optimisation of ``io_*`` keyword options (the CLI's ``--io-*``), checked; those not
    given take the model's defaults (its own where its file holds them), or without a network those of
    :mod:`cyclereg.registration.networkfree`."""
    import dataclasses

    from cyclereg.core.errors import UsageError
    from cyclereg.registration.tuning import InstanceOptimisation, settings

    names = {f"io_{f.name}" for f in dataclasses.fields(InstanceOptimisation)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; expected some of passes, {', '.join(sorted(names))}")
    return settings({k[3:]: v for k, v in options.items()}, info, networkfree=network is None)


class Registration:
    """A registered pair: the map from the fixed image's space to the moving image's, at every voxel of
    the fixed image. Built by :func:`register`."""

    def __init__(self, reg, device):
        from cyclereg.registration.fixed_grid import on_fixed_grid

        self._reg, self._device = reg, device
        self._grid = on_fixed_grid(reg, device)

    @property
    def fixed(self):
        return self._reg.pair.fixed

    @property
    def warped(self):
        """The moving image on the fixed image's grid (SimpleITK, the moving image's pixel type)."""
        return self.warp(self._reg.pair.moving)

    def warp(self, image, nearest: bool = False):
        """Any image of the moving subject's space (path or SimpleITK image) on the fixed grid, with ITK's
        rules (linear, or ``nearest`` for label maps; 0 outside), keeping its pixel type."""
        import SimpleITK as sitk

        from cyclereg.io.images import Geometry, read_image, to_image
        from cyclereg.registration.register import warp_image

        image = image if isinstance(image, sitk.Image) else read_image(image, "image")
        points = self._grid.domain_of(Geometry.of(image))
        return to_image(warp_image(image, points, nearest), self.fixed, image.GetPixelID())

    @property
    def transform(self):
        """The whole map in physical space as a SimpleITK transform, fixed points to moving points, so
        ``sitk.Resample(moving, fixed, transform)`` warps: the composite of the affine transform and the
        model's displacement field (or the field alone with ``affine="none"``)."""
        from cyclereg.registration.register import map_transform

        return map_transform(self._reg, self._grid)

    @property
    def affine(self):
        """The affine stage's transform (SimpleITK, fixed points to moving points), or None."""
        return self._reg.pair.affine

    @property
    def inverse(self):
        """The inverse map, moving points to fixed points (SimpleITK): the affine's inverse, then the
        model's reverse map (one more network run)."""
        from cyclereg.registration.register import inverse_transform

        return inverse_transform(self._reg, self._device)

    @property
    def jacobian(self):
        """The Jacobian determinant of the map on the fixed grid (SimpleITK, float32)."""
        from cyclereg.io.images import to_image

        return to_image(self._grid.det_per_voxel(), self.fixed)

    def write(self, warped=None, transform=None, jacobian=None, warped_labels=None, figure=None,
              transform_inverse=None) -> dict:
        """Write the outputs named (as ``cyclereg register`` does); returns the summary (folds, det J range)."""
        from cyclereg.registration.register import write_outputs

        return write_outputs(self._reg, self._device, warped=warped, transform=transform, jacobian=jacobian,
                             warped_labels=warped_labels, figure=figure, transform_inverse=transform_inverse)


def register(fixed, moving, model=None, *, moving_labels=None, passes: int = 1, affine="auto",
             affine_similarity: str = "ncc", **options) -> Registration:
    """Register ``moving`` to ``fixed`` (paths or SimpleITK images, 2D or 3D) with ``model`` (a model file's
    path, :func:`load_model`'s result, or ``"none"``: no network, the map optimised on the pair; default: the
    shipped model, ``"none"`` where none ships), after the affine stage: ``affine`` is ``"auto"``, ``"none"``, a
    transform file or a SimpleITK transform (the CLI's ``--affine``). ``passes`` and the ``io_*`` options
    are the CLI's ``--passes`` and ``--io-*`` (``io_steps=50``: instance optimisation of the weights;
    ``io_field_steps``: of the map)."""
    from cyclereg.registration.register import align, read_pair, register_pair

    runner, info, tuning, device = _runner(model, passes, options)
    pair = read_pair(fixed, moving, moving_labels, dim=info.dim if info else None, names=("fixed", "moving", "moving_labels"))
    pair = align(pair, affine, affine_similarity, device, option="affine")
    return Registration(register_pair(runner, info, pair, tuning, device), device)


def evaluate(model, pairs_csv=None, *, labels=None, per_pair=None, dataset=None, root=None, digit=None, size=None,
             split: str = "heldout", pairs: int = 100, seed: int = 0, passes: int = 1, affine: str = "auto",
             affine_similarity: str = "ncc", **options) -> dict:
    """Score ``model`` on the pairs of ``pairs_csv`` (files in physical space; ``labels``: a list of labels
    scored; each pair after the affine stage, ``affine``: ``"auto"`` or ``"none"``), or on ``pairs`` seeded pairs of a dataset (``dataset``: ``"mnist"`` or ``"triangles"``,
    default the model's). Returns the summary of ``docs/metrics.md``."""
    from cyclereg.core.distributed import Context
    from cyclereg.core.errors import UsageError

    runner, info, tuning, device = _runner(model, passes, options)
    if pairs_csv is not None:
        from cyclereg.evaluation.files import evaluate_csv

        return evaluate_csv(runner, info, pairs_csv, tuning, labels, per_pair, progress=False, ctx=Context(device=device),
                            affine=affine, affine_similarity=affine_similarity)
    if runner is None:
        raise UsageError("model 'none' registers image files: give pairs_csv (a dataset scores a model on its kind of data)")
    from cyclereg.evaluation.datasets import evaluate_dataset

    return evaluate_dataset(runner, info, dataset, root, digit, size, split, pairs, seed, tuning)


def train(config, out, *, resume: bool = False, device=None, progress: bool = True, overrides=()):
    """Train from ``config`` (a TOML path, a dict of its tables, or a :class:`~cyclereg.core.config.Config`)
    into the folder ``out``; ``overrides`` are ``key=value`` strings (``--set``). Returns the model
    file's path."""
    from cyclereg.core.config import Config, apply_overrides, config_from_dict, load_config
    from cyclereg.training.train import train as run

    if isinstance(config, dict):
        config = config_from_dict(apply_overrides(config, overrides))
    elif not isinstance(config, Config):
        config = load_config(config, overrides)
    return run(config, out, resume=resume, device=device, progress=progress)
