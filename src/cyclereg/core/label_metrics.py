"""Measures in physical units: surface distances and volumes of label maps, statistics of a
Jacobian determinant.

Arrays are numpy arrays in tensor axis order, without batch or channel dimensions: ``(D, H, W)``
(z, y, x) in 3D, ``(H, W)`` in 2D, as in :mod:`cyclereg.core.coords`. ``spacing`` is the voxel size in mm
in that *same* order (ITK's order, x first, appears only in :func:`_distance_to`). ``spacing=None``
means 1 mm along every axis. Dice and the determinant itself are in :mod:`cyclereg.core.metrics`.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from cyclereg.core.coords import check_spacing
from cyclereg.core.metrics import folded

__all__ = ["hd95", "label_volumes", "log_jacobian_std", "folded_percent"]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it; outside the image counts as outside
    (``mask ^ binary_erosion(mask)`` with scipy's default structure and border, as MONAI uses)."""
    padded = np.pad(mask, 1)
    inner = padded.copy()
    for axis in range(mask.ndim):
        inner &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
    return (padded & ~inner)[(slice(1, -1),) * mask.ndim]


def _distance_to(surface: np.ndarray, spacing) -> np.ndarray:
    """Euclidean distance in mm from every voxel centre to the nearest voxel of ``surface``."""
    # Padded, so that surface voxels at the image border stay on ITK's contour.
    image = sitk.GetImageFromArray(np.pad(surface, 1).astype(np.uint8))
    image.SetSpacing(tuple(spacing[::-1]))  # ITK: x first
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    # Every surface voxel lies on the contour of the surface mask, so |d| is the distance to the surface
    # (ITK computes it in float32: set the surface itself to exactly 0 rather than about 1e-7).
    out = np.abs(sitk.GetArrayFromImage(dist)[(slice(1, -1),) * surface.ndim]).astype(np.float64)
    out[surface] = 0.0
    return out


def hd95(a, b, labels, spacing=None, percentile: float = 95.0) -> np.ndarray:
    """Symmetric 95th-percentile Hausdorff distance in mm per label: an array ``(len(labels),)``.

    The surface of label ``l`` in a map is the set of its voxels with a face neighbour of another
    label (or outside the image); distances are between voxel centres. The directed distance
    ``a -> b`` is the ``percentile`` of the distances from each surface voxel of ``a`` to the nearest
    surface voxel of ``b`` (``np.percentile``, linear interpolation); the result is the **maximum
    of the two directed percentiles**, as MONAI's ``compute_hausdorff_distance(percentile=95)``
    (not the percentile of the pooled distances).

    A label absent from both maps scores NaN (left out of means, as in
    :func:`cyclereg.core.metrics.dice_labels`); a label present in only one scores ``inf``, so that a
    lost structure shows in a mean instead of being dropped.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"hd95: a and b must be 2D or 3D label maps of one shape, got {a.shape} and {b.shape}")
    spacing = check_spacing(spacing, a.ndim, "hd95: spacing")
    out = np.full(len(labels), np.nan)
    for i, label in enumerate(labels):
        ma, mb = a == label, b == label
        if not ma.any() and not mb.any():
            continue
        if not (ma.any() and mb.any()):
            out[i] = np.inf
            continue
        # Only the bounding box of both masks matters: distances inside it are the same as in the whole image.
        nz = np.nonzero(ma | mb)
        box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in nz)
        sa, sb = _surface(ma[box]), _surface(mb[box])
        a_to_b = np.percentile(_distance_to(sb, spacing)[sa], percentile)
        b_to_a = np.percentile(_distance_to(sa, spacing)[sb], percentile)
        out[i] = max(a_to_b, b_to_a)
    return out


def label_volumes(labels_array, labels, spacing=None) -> np.ndarray:
    """Volume in mm³ (area in mm² in 2D) of each label: voxel count × voxel volume, ``(len(labels),)``."""
    labels_array = np.asarray(labels_array)
    voxel = math.prod(check_spacing(spacing, labels_array.ndim, "label_volumes: spacing"))
    return np.array([np.count_nonzero(labels_array == label) * voxel for label in labels], dtype=np.float64)


def log_jacobian_std(det) -> float:
    """Standard deviation (numpy's, ``ddof=0``) of ``log det J`` over the voxels where ``det > 0``;
    folded voxels (``det <= 0``) have no logarithm and are left out (count them with
    :func:`folded_percent`). ``det`` is one image's determinant of any shape, e.g. an item of
    :func:`cyclereg.core.metrics.jacobian_determinant`. NaN when no voxel has ``det > 0``."""
    det = np.asarray(det, dtype=np.float64).ravel()
    positive = det[det > 0]
    return float(np.std(np.log(positive))) if positive.size else math.nan


def folded_percent(det) -> float:
    """Percentage of voxels with ``det <= 0``, the folds of :func:`cyclereg.core.metrics.folded`. NaN for an
    empty ``det``."""
    det = np.asarray(det, dtype=np.float64)
    return float(100.0 * np.count_nonzero(folded(det)) / det.size) if det.size else math.nan
