"""How a model is tuned to the one pair it registers (instance optimisation): the settings only, light
to import (the command line builds its options from them). The work is done in
:func:`cyclereg.registration.instance.instance_optimisation` (the weights) and :mod:`cyclereg.registration.refine` (the map)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cyclereg.core.errors import DataError, UsageError

__all__ = ["InstanceOptimisation", "NO_IO", "NETWORK_FREE", "defaults", "settings", "check_networkfree"]


@dataclass(frozen=True)
class InstanceOptimisation:
    """Instance optimisation (ICON, GradICON): fine-tune the trained model on the one pair it
    registers, ``steps`` Adam steps of rate ``lr`` on its training loss.

    ``downsample`` > 1 tunes only the model's leading steps downsampled by a multiple of it, on the
    pair downsampled by it (:func:`~cyclereg.models.registration.coarse_view`); the finer steps run as trained.
    A step then costs about ``downsample^-d`` of one on the model grid: on the brain recipe's 2 mm
    model (``configs/brain3d_fine.toml``), a step of the whole model took 10.5 s on this project's
    2-core CPU, a step with ``downsample = 2`` 1.1 s.

    ``field_steps`` > 0 then refines the map itself (:func:`~cyclereg.registration.refine.refine_map`): a smooth
    residual field on a grid ``field_downsample`` times coarser than the model grid, Adam's step
    ``field_lr`` in voxels, diffusion weight ``field_weight``."""

    steps: int = 0
    lr: float = 2e-4
    downsample: int = 1
    field_steps: int = 0
    field_lr: float = 0.1
    field_weight: float = 3.0
    field_downsample: int = 4

    def __post_init__(self):
        if self.steps < 0:
            raise UsageError(f"--io-steps: expected a number of steps >= 0, got {self.steps}")
        if not self.lr > 0:
            raise UsageError(f"--io-lr: expected a learning rate > 0, got {self.lr}")
        if self.downsample not in (1, 2, 4):
            raise UsageError(f"--io-downsample: expected 1, 2 or 4, got {self.downsample}")
        if self.field_steps < 0:
            raise UsageError(f"--io-field-steps: expected a number of steps >= 0, got {self.field_steps}")
        if not self.field_lr > 0:
            raise UsageError(f"--io-field-lr: expected a step in voxels > 0, got {self.field_lr}")
        if not self.field_weight >= 0:
            raise UsageError(f"--io-field-weight: expected a weight >= 0, got {self.field_weight}")
        if self.field_downsample < 1:
            raise UsageError(f"--io-field-downsample: expected a factor >= 1, got {self.field_downsample}")


NO_IO = InstanceOptimisation()
# Registration without a network (register --model none, cyclereg.registration.networkfree): the map alone,
# optimised from the identity; chosen on held-out pairs of T1 brain scans of different people.
NETWORK_FREE = InstanceOptimisation(field_steps=50, field_lr=0.1, field_weight=3.0, field_downsample=2)


def defaults(info=None) -> InstanceOptimisation:
    """What registration with a model of ``info`` (:class:`~cyclereg.models.modelfile.ModelInfo`) does when no
    ``--io-*`` option is given: the model's own settings, chosen on held-out pairs when it was shipped and
    kept in its file (``info.tuning``: field name -> value, checked here), else :data:`NO_IO`."""
    own = info.tuning if info is not None else {}
    unknown = sorted(set(own) - {f.name for f in dataclasses.fields(InstanceOptimisation)})
    if unknown:
        raise DataError(f"the model file's header 'tuning' names {unknown[0]!r}, which is not an instance optimisation setting")
    try:
        return dataclasses.replace(NO_IO, **own)
    except UsageError as err:
        raise DataError(f"the model file's header 'tuning' is not valid: {err}") from None


def settings(given: dict, info=None, networkfree: bool = False) -> InstanceOptimisation:
    """The settings ``given`` (field name -> value; None: not given) over the :func:`defaults` of a model of
    ``info``, or with ``networkfree`` over :data:`NETWORK_FREE`'s, checked."""
    base = NETWORK_FREE if networkfree else defaults(info)
    tuning = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    return check_networkfree(tuning) if networkfree else tuning


def check_networkfree(tuning: InstanceOptimisation) -> InstanceOptimisation:
    """``tuning`` if it can register without a network: no weights to tune, and some steps on the map."""
    if tuning.steps:
        raise UsageError("--io-steps tunes a network's weights; --model none has no network (use --io-field-steps)")
    if not tuning.field_steps:
        raise UsageError("--model none: the map is optimised by --io-field-steps; expected at least 1 step")
    return tuning
