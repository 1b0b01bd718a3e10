"""The coordinate convention of cyclereg, written once.

Every other module links here instead of restating it.

* **Tensors.** Images are ``(N, C, *spatial)`` with ``spatial = (H, W)`` in 2D and ``(D, H, W)`` in
  3D, exactly as PyTorch stores them. The dimension ``d`` is ``tensor.ndim - 2``.
* **Points.** A set of points is a tensor ``(N, d, *S)`` for any point layout ``S`` (usually a grid).
  Component ``k`` is the coordinate along spatial *tensor axis* ``k`` (row first in 2D; depth first
  in 3D). There is no hidden ``x, y, z`` reordering anywhere in cyclereg except in
  :func:`to_grid_sample`, the single bridge to :func:`torch.nn.functional.grid_sample`.
* **Domain.** Coordinates are normalised to ``[0, 1]`` along each axis, voxel centres included:
  voxel index ``i`` of an axis of size ``n`` sits at ``i / (n - 1)`` (``align_corners=True``). A map
  is therefore independent of resolution: a field predicted on a coarse grid is evaluated at the
  points of a fine grid as it is.
* **Maps pull back.** A map ``Φ_AB`` takes points of the *fixed* image B's domain to points of the
  *moving* image A's domain, and ``I_A ∘ Φ_AB ≈ I_B``: the warped moving image is ``I_A(Φ_AB(x))``
  sampled at the fixed grid ``x``. A network called as ``net(moving, fixed)`` returns
  ``Φ_AB = Id + D_AB``.
* **Voxel units** are used for reporting (inverse-consistency error, Jacobians): multiply a
  coordinate difference along axis ``k`` by ``n_k - 1`` (:func:`voxel_scale`).

``tests/test_coords.py`` pins this: moving the content of an image by one voxel along an axis is
recovered by a map shifted by ``1 / (n - 1)`` along that same component.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["identity_grid", "to_grid_sample", "voxel_scale", "spatial_dims", "check_spacing"]


def spatial_dims(tensor: torch.Tensor) -> int:
    """Number of spatial dimensions of an ``(N, C, *spatial)`` tensor (2 or 3)."""
    d = tensor.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"expected a tensor (N, C, H, W) or (N, C, D, H, W), got shape {tuple(tensor.shape)}")
    return d


@lru_cache(maxsize=32)
def _identity_grid_cached(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    axes = [torch.linspace(0.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """The identity map on a grid of ``shape`` (``(H, W)`` or ``(D, H, W)``).

    Returns a tensor ``(1, d, *shape)`` of voxel-centre coordinates in ``[0, 1]``. The result is
    cached per shape, device and dtype and must not be modified in place.
    """
    return _identity_grid_cached(tuple(int(n) for n in shape), torch.device(device or "cpu"), dtype)


def voxel_scale(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Factors ``(1, d, 1, ...)`` that turn domain coordinate differences into voxels (``n_k - 1``)."""
    d = len(shape)
    scale = torch.tensor([max(n - 1, 1) for n in shape], device=device, dtype=dtype)
    return scale.view(1, d, *([1] * d))


def to_grid_sample(points: torch.Tensor) -> torch.Tensor:
    """Points ``(N, d, *S)`` in cyclereg's convention -> a ``grid_sample`` grid ``(N, *S, d)``.

    ``grid_sample`` wants coordinates in ``[-1, 1]`` with the *last* spatial axis first
    (``x, y[, z]``); this is the only place where that order appears.
    """
    grid = points.movedim(1, -1).flip(-1)  # flip makes a copy, so it may be scaled in place
    return grid.mul_(2.0).sub_(1.0)


def check_spacing(spacing, ndim: int, what: str) -> tuple[float, ...]:
    """Voxel spacing in mm in tensor axis order (``None``: 1 mm per axis), checked: ``ndim`` finite
    positive numbers, else a ``ValueError`` naming ``what``."""
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{what} must be {ndim} positive numbers in tensor axis order, got {spacing}")
    return spacing
