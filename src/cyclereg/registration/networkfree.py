"""Registration without a trained network (``register --model none``): after the affine stage, the map
is optimised on the one pair alone, from the identity, by the field refinement of :mod:`.refine`
(box LNCC + diffusion on a smooth residual field), on a grid chosen from the fixed image.

This is what ``register`` does when no ``--model`` is given and no default model ships. The grid is
isotropic, at most :data:`GRID_VOXELS` voxels (64³ in 3D, 512² in 2D), and never finer than the fixed
image: a 1 mm 256³ brain is optimised on a 4 mm grid. The defaults (:data:`~cyclereg.registration.tuning.NETWORK_FREE`) were chosen on
held-out pairs of different people's T1 brain scans (``benchmarks/real_brains.py``): on fs02 → fs01,
Dice 0.682 after the affine stage, 0.777 after 50 steps on the 4 mm grid with the residual on an 8 mm grid.
"""

from __future__ import annotations

import math

import SimpleITK as sitk
import torch

from cyclereg.core.transforms import Identity, Transform
from cyclereg.io.preprocess import Preprocessing
from cyclereg.registration.refine import refine_as
from cyclereg.registration.tuning import InstanceOptimisation, check_networkfree

__all__ = ["NO_NETWORK", "GRID_VOXELS", "preprocessing", "optimised_map"]

NO_NETWORK = "none"  # the --model value (and the Python API's model=) that registers without a network
GRID_VOXELS = 64 ** 3  # the optimisation grid's most voxels


def preprocessing(fixed: sitk.Image) -> Preprocessing:
    """The optimisation grid for ``fixed``: isotropic, its spacing the smallest that keeps the fixed image's
    extent within :data:`GRID_VOXELS` voxels, and at least the image's finest spacing; intensities clamped
    to their 0.5 and 99.5 percentiles (robust to MR's bright outliers)."""
    extent = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    spacing = max(min(fixed.GetSpacing()), (math.prod(extent) / GRID_VOXELS) ** (1 / len(extent)))
    return Preprocessing(intensity="percentile", spacing=(spacing,) * len(extent))


def optimised_map(moving: torch.Tensor, fixed: torch.Tensor, tuning: InstanceOptimisation) -> Transform:
    """The map for prepared inputs ``(1, 1, *spatial)``: the identity refined as ``tuning`` says."""
    return refine_as(check_networkfree(tuning), Identity(), moving, fixed)
