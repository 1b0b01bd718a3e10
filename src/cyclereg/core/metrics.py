"""Measures of a registration: Jacobian determinant, folds, Dice, inverse-consistency error.

Maps are points on a grid, as in :mod:`cyclereg.core.coords`; derivatives are taken in voxel units so
that the identity has Jacobian determinant 1 on any grid.
"""

from __future__ import annotations

import torch

from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.core.transforms import Transform

__all__ = ["forward_differences", "jacobian_matrix", "jacobian_determinant", "displacement_determinant", "folded", "count_folds", "dice_threshold", "dice_labels", "ic_error"]


def forward_differences(values: torch.Tensor, cropped: bool = False) -> list[torch.Tensor]:
    """``x[i + 1] − x[i]`` along each spatial axis of ``(N, C, *shape)``, one tensor per axis. With
    ``cropped``, each is cut to the ``shape − 1`` cells of the grid so that they line up cell by cell
    (a Jacobian); otherwise axis ``k`` keeps every other axis whole (a smoothness penalty)."""
    shape = values.shape[2:]
    out = []
    for k in range(len(shape)):
        diff = torch.diff(values, dim=2 + k)
        if cropped:
            diff = diff[(slice(None), slice(None)) + tuple(slice(0, n - 1) for n in shape)]
        out.append(diff)
    return out


def jacobian_matrix(points: torch.Tensor) -> torch.Tensor:
    """Forward-difference Jacobian of a map sampled on its grid.

    ``points (N, d, *shape)`` -> ``(N, *(shape - 1), d, d)`` with entry ``[..., i, k] = ∂Φ_i/∂x_k``
    in voxels per voxel. Forward differences (rather than central ones) see a single swapped voxel.
    """
    vox = points * voxel_scale(points.shape[2:], points.device, points.dtype)
    jac = torch.stack(forward_differences(vox, cropped=True), dim=2)  # (N, d_i, d_k, *shape-1)
    return jac.movedim(1, -1).movedim(1, -1)


def jacobian_determinant(points: torch.Tensor) -> torch.Tensor:
    """Determinant of :func:`jacobian_matrix`: ``(N, *(shape - 1))``; 1 for the identity. Computed by
    cofactors straight from the differences along each axis (entry ``[i, k]`` is component ``i`` of the
    difference along axis ``k``), without building the matrices: much faster than ``linalg.det``."""
    return _by_slabs(points, identity=False)


def displacement_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """:func:`jacobian_determinant` of the map ``x + displacement`` on its grid (``(N, d, *shape)``, domain
    units), from the displacement's differences plus the identity's: no grid of points, and no
    difference of two nearly equal coordinates."""
    return _by_slabs(displacement, identity=True)


SLAB = 8  # cells along the first axis computed at a time: a 256² slab of them stays in the CPU's caches


def _by_slabs(values: torch.Tensor, identity: bool) -> torch.Tensor:
    """The determinants of the cells, ``SLAB`` layers of them along the first axis at a time (several times
    faster on a 256³ grid than on the whole, and a fraction of the memory)."""
    scale = voxel_scale(values.shape[2:], values.device, values.dtype)
    n = values.shape[2]
    slabs = [_determinant(_differences(values[:, :, s:min(s + SLAB, n - 1) + 1] * scale, identity))
             for s in range(0, max(n - 1, 1), SLAB)]
    return torch.cat(slabs, 1)


def _differences(vox: torch.Tensor, identity: bool) -> list[list[torch.Tensor]]:
    """Entry ``[i][k]``: component ``i`` of the forward difference along axis ``k``, cropped (plus 1 on the
    diagonal for a displacement)."""
    diffs = forward_differences(vox, cropped=True)
    j = [[diffs[k][:, i] for k in range(len(diffs))] for i in range(len(diffs))]
    if identity:
        for i in range(len(j)):
            j[i][i] = j[i][i] + 1
    return j


def _determinant(j: list[list[torch.Tensor]]) -> torch.Tensor:
    if len(j) == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    (a, b, c), (d, e, f), (g, h, i) = j
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def folded(det: torch.Tensor) -> torch.Tensor:
    """Where a map folds: ``det J <= 0`` (a zero determinant is not invertible either). The one
    definition of a fold in cyclereg (``docs/metrics.md``)."""
    return det <= 0


def count_folds(points: torch.Tensor) -> torch.Tensor:
    """Number of grid cells where the map folds (:func:`folded`), per batch item ``(N,)``."""
    return folded(jacobian_determinant(points)).flatten(1).sum(1)


def dice_threshold(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice of ``a > threshold`` and ``b > threshold`` per batch item (the ICON paper's measure)."""
    ma, mb = (a > threshold).flatten(1), (b > threshold).flatten(1)
    inter = (ma & mb).sum(1).double()
    total = (ma.sum(1) + mb.sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def dice_labels(a: torch.Tensor, b: torch.Tensor, labels) -> torch.Tensor:
    """Dice per label: ``(N, len(labels))`` for integer label maps ``a``, ``b`` of equal shape.
    A label absent from both maps scores NaN (it is left out of means)."""
    out = []
    for lab in labels:
        ma, mb = (a == lab).flatten(1), (b == lab).flatten(1)
        inter = (ma & mb).sum(1).double()
        total = (ma.sum(1) + mb.sum(1)).double()
        out.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.full_like(total, float("nan"))))
    return torch.stack(out, 1)


def ic_error(phi_ab: Transform, phi_ba: Transform, shape, like: torch.Tensor) -> torch.Tensor:
    """Mean distance in voxels between ``Φ_BA(Φ_AB(x))`` and ``x`` over the fixed grid ``x`` of
    ``shape``, per item ``(N,)``: the inverse-consistency error of ``docs/metrics.md``, in mm for an
    image of 1 mm voxels (``evaluate --pairs-csv`` measures it in the images' physical space)."""
    grid = identity_grid(shape, like.device, like.dtype).expand(like.shape[0], -1, *shape)
    residual = (phi_ba @ phi_ab).displacement(grid) * voxel_scale(shape, like.device, like.dtype)
    return residual.norm(dim=1).flatten(1).mean(1)
