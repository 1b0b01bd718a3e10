"""Preprocessing, the same at training and at registration: the model grid and intensity normalisation.

A model runs on a *model grid*: a regular grid in physical space with the model's voxel spacing,
the direction of the reference image (the fixed image, or a training set's first scan), centred on
that image, with a size rounded up to a multiple the network accepts. Every image, fixed or moving,
is resampled onto this grid *in physical space* with SimpleITK (so a moving image of another size,
spacing or orientation lands where it belongs; the images are expected to be affinely aligned, as for
any deformable registration). Without a model spacing the model grid is the reference image's own
grid (synthetic 2D data, whose pixels have no physical size). The model's map lives on the model
grid's ``[0, 1]`` domain (:mod:`cyclereg.core.coords`); :mod:`cyclereg.registration.register` carries it back to the
fixed image's own grid.

Intensities are clamped and scaled to the model's range ``[low, high]``: ``minmax`` (the image's
minimum and maximum), ``percentile`` (the ``percentiles`` of the image, for MR), ``window`` (a fixed
window such as a CT HU window) or ``none``. Voxels outside the image take the lowest value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch

from cyclereg.core.errors import DataError
from cyclereg.io.images import Geometry

__all__ = ["Preprocessing", "model_grid", "resample", "intensity_bounds", "prepare"]

from cyclereg.core.config import INTENSITY_MODES  # the names configs may use, defined once


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn an image file into a network input; stored in the model file."""

    intensity: str = "minmax"  # minmax, percentile, window, none
    percentiles: tuple = (0.5, 99.5)  # percentile: the clamp, in percent
    window: tuple = (-1000.0, 1000.0)  # window: the clamp, in image units (CT: HU)
    range: tuple = (0.0, 1.0)  # the model's input range
    spacing: tuple = ()  # the model grid's spacing in mm, ITK order (x, y[, z]); empty: the image's own grid
    pad_multiple: int = 1  # the model grid's size is rounded up to a multiple of this
    direction: tuple = ()  # the model grid's axes (ITK direction, row-major); empty: the reference image's

    def __post_init__(self):
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity normalisation {self.intensity!r}: expected one of {list(INTENSITY_MODES)}")
        if any(not s > 0 for s in self.spacing) or self.pad_multiple < 1 or len(self.range) != 2:
            raise ValueError(f"preprocessing {self}: spacings must be > 0, pad_multiple >= 1, range two values")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessing":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def model_grid(reference: sitk.Image, prep: Preprocessing, size=None) -> Geometry:
    """The model grid of ``reference`` (see the module docstring). ``size`` (ITK order) forces the
    grid's size, for networks built for one input shape. With ``prep.direction`` (a model trained in a
    common space) the grid takes those axes, whatever the reference's, and covers its extent along them."""
    ref = Geometry.of(reference)
    spacing = tuple(float(s) for s in prep.spacing) if prep.spacing else ref.spacing
    if len(spacing) != ref.dim:
        raise DataError(f"the model's spacing {spacing} is {len(spacing)}D but the image is {ref.dim}D")
    own = np.asarray(ref.direction, float).reshape(ref.dim, ref.dim)
    direction = np.asarray(prep.direction, float).reshape(ref.dim, ref.dim) if prep.direction else own
    if size is None:
        # The reference's extent along the grid's axes (its own axes: its size times its spacing).
        extent = np.abs(direction.T @ own) @ (np.asarray(ref.spacing) * np.asarray(ref.size))
        m = max(1, prep.pad_multiple)
        size = tuple(int(math.ceil(max(2, round(e / t)) / m) * m) for e, t in zip(extent, spacing))
    size = tuple(int(n) for n in size)
    # Same centre as the reference: origin = centre - direction @ (spacing * (size - 1) / 2).
    centre = np.asarray(ref.origin) + own @ (np.asarray(ref.spacing) * (np.asarray(ref.size) - 1) / 2)
    origin = centre - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    return Geometry(size, spacing, tuple(float(o) for o in origin), tuple(float(v) for v in direction.ravel()))


def resample(image: sitk.Image, grid: Geometry, nearest: bool = False, default: float = 0.0,
             transform: sitk.Transform | None = None) -> sitk.Image:
    """``image`` resampled onto ``grid`` in physical space (linear or nearest; ``default`` outside),
    through ``transform`` (grid points to the image's points) if given."""
    if Geometry.of(image) == grid and transform is None:
        return image
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
    source = image if nearest else sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(source, grid.size, transform or sitk.Transform(), interpolator, grid.origin, grid.spacing,
                         grid.direction, float(default), pixel)


def _antialias(image: sitk.Image, grid: Geometry) -> sitk.Image:
    """Gaussian smoothing before resampling to a coarser grid: variance (new spacing / 2)² (mm²) along the
    axes whose spacing grows. Where the new spacing is at least twice the old, blocks of ``f`` voxels
    (``f`` the ratio's half, whole) are averaged first, which adds ``(f² − 1) s² / 12``; ITK's discrete
    Gaussian adds the rest on the ``f``-times smaller image, a kernel of one or two of its voxels
    (exact in variance, where the recursive Gaussian falls short below two voxels). A 1 mm 256³ brain
    for a 4 mm grid: 0.2 s, against 1 s for the recursive Gaussian on the whole image, with two samples
    still per new voxel for the linear resampling that follows."""
    source, target = np.asarray(image.GetSpacing()), np.asarray(grid.spacing)
    coarser = target > 1.01 * source
    if not coarser.any():
        return image
    out = sitk.Cast(image, sitk.sitkFloat32)
    # whole blocks, with a tolerance: a 4 mm grid computed from a 256 mm extent is 3.9999999999999996 mm
    factors = [max(1, int(t / (2 * s) + 1e-6)) if c else 1 for s, t, c in zip(source, target, coarser)]
    if max(factors) > 1:
        out = sitk.BinShrink(out, factors)
    variance = [(0.5 * t) ** 2 - (f * f - 1) * s * s / 12 if c else 0.0
                for s, t, f, c in zip(source, target, factors, coarser)]
    return sitk.DiscreteGaussian(out, [float(v) for v in variance], 32, 0.01, True)


def intensity_bounds(array: np.ndarray, prep: Preprocessing, role: str = "image") -> tuple[float, float]:
    """The image values that map to the model's ``range`` (clamped outside)."""
    if prep.intensity == "none":
        return prep.range
    if prep.intensity == "window":
        lo, hi = prep.window
    elif prep.intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(array, prep.percentiles))
        if not hi > lo:  # mostly background: fall back to the full range
            lo, hi = float(array.min()), float(array.max())
    else:
        lo, hi = float(array.min()), float(array.max())
    if not hi > lo:
        raise DataError(f"{role} is constant (every voxel {lo:g}); nothing to register")
    return float(lo), float(hi)


def prepare(image: sitk.Image, grid: Geometry, prep: Preprocessing, role: str = "image",
            transform: sitk.Transform | None = None) -> torch.Tensor:
    """The network input of ``image`` on ``grid`` (through ``transform``, grid points to the image's
    points, if given): ``(1, 1, *spatial)`` float32 in ``prep.range``."""
    lo, hi = intensity_bounds(sitk.GetArrayViewFromImage(image), prep, role)  # finite: read_image checked it
    values = sitk.GetArrayFromImage(resample(_antialias(image, grid), grid, default=lo, transform=transform)).astype(np.float32)
    out = torch.from_numpy(values)[None, None]
    if prep.intensity == "none":
        return out
    low, high = prep.range
    return low + (out.clamp(lo, hi) - lo) / (hi - lo) * (high - low)
