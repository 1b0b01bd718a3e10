"""Transforms as functions of points, and warping.

Coordinates follow :mod:`cyclereg.core.coords` (points ``(N, d, *S)`` in ``[0, 1]``, component ``k``
along tensor axis ``k``, maps pull back from fixed to moving). A transform is called on points and
returns points; it is evaluated internally in displacement form (``Φ(x) = x + D(x)``) so that
compositions and inverse-consistency residuals never subtract two nearly equal coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cyclereg.core.coords import identity_grid, to_grid_sample

__all__ = ["sample", "sample_axes", "resize", "Transform", "Identity", "DisplacementField", "Composed", "warp", "map_on_grid", "exp_velocity"]


def sample(values: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Interpolate ``values (N, C, *shape)`` at ``points (N, d, *S)``; returns ``(N, C, *S)``.

    Linear (``mode="bilinear"``, trilinear in 3D) or ``"nearest"``; outside the domain the border
    value is repeated. ``points`` may have batch size 1 and is then shared by all ``N``.
    """
    if points.shape[0] != values.shape[0]:
        points = points.expand(values.shape[0], *points.shape[1:])
    return F.grid_sample(values, to_grid_sample(points), mode=mode, padding_mode="border", align_corners=True)


def sample_axes(values: torch.Tensor, axes) -> torch.Tensor:
    """``values (N, C, *shape)`` linearly interpolated at the grid spanned by ``axes``, one 1-D tensor of
    domain coordinates per spatial axis: :func:`sample` at ``meshgrid(*axes)`` (border value outside),
    computed as one small interpolation matrix per axis, applied by matrix products, without a grid of
    points. On a fine grid (a 256³ image's voxels from a 64³ field) it takes a fraction of ``sample``'s
    time and memory."""
    letters = "xyz"[:values.ndim - 2]
    for k, u in enumerate(axes):
        weights = _interpolation_matrix(u.to(values.device, values.dtype), values.shape[2 + k])
        out = letters[:k] + "o" + letters[k + 1:]
        values = torch.einsum(f"o{letters[k]},nc{letters}->nc{out}", weights, values)
    return values


def _interpolation_matrix(u: torch.Tensor, n: int) -> torch.Tensor:
    """``(len(u), n)``: row ``i`` holds the linear-interpolation weights of domain coordinate ``u[i]`` on
    ``n`` nodes, ``u`` clamped to the domain (grid_sample's border padding, ``align_corners=True``)."""
    pos = (u * (n - 1)).clamp(0, n - 1)
    lo = pos.floor().clamp(max=max(n - 2, 0)).long()
    frac = pos - lo
    rows = torch.arange(len(u), device=u.device)
    weights = torch.zeros(len(u), n, device=u.device, dtype=u.dtype)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, (lo + 1).clamp(max=n - 1)), frac, accumulate=True)
    return weights


def resize(values: torch.Tensor, size) -> torch.Tensor:
    """``values (N, C, *shape)`` interpolated linearly onto a grid of ``size`` with the same ``[0, 1]``
    domain (corner voxels kept where they are): :func:`sample` at that grid's identity, far cheaper."""
    return F.interpolate(values, size=tuple(size), mode="bilinear" if values.ndim == 4 else "trilinear", align_corners=True)


class Transform:
    """A map ``Φ`` from the fixed domain to the moving domain; call it on points ``(N, d, *S)``."""

    def displacement(self, points: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """``Φ(points) - points``."""
        raise NotImplementedError

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return points + self.displacement(points)

    def displacement_on_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """``displacement(grid)`` for the identity grid ``(N, d, *shape)`` of a whole image; subclasses
        skip interpolation where their values already sit on that grid."""
        return self.displacement(grid)

    def take(self, index: torch.Tensor) -> "Transform":  # pragma: no cover - interface
        """The transform of the batch items ``index`` (for example a batch rolled by half)."""
        raise NotImplementedError

    def __matmul__(self, inner: "Transform") -> "Transform":
        """``outer @ inner`` is the composition ``outer ∘ inner`` (inner applied first)."""
        return Composed(self, inner)


class Identity(Transform):
    def displacement(self, points):
        return torch.zeros_like(points)

    def take(self, index):
        return self


class DisplacementField(Transform):
    """``Φ = Id + D`` with ``D`` a field ``(N, d, *shape)`` on a regular grid of the domain,
    linearly interpolated between its nodes (and so defined at any resolution)."""

    def __init__(self, field: torch.Tensor):
        if field.ndim - 2 != field.shape[1]:
            raise ValueError(f"DisplacementField: expected a field (N, d, *spatial) with d spatial axes, got {tuple(field.shape)}")
        self.field = field

    def displacement(self, points):
        return sample(self.field, points)

    def displacement_on_grid(self, grid):
        if grid.shape[2:] == self.field.shape[2:]:  # the field's own nodes: its values, no interpolation
            return self.field.expand(grid.shape[0], *self.field.shape[1:])
        return self.displacement(grid)

    def take(self, index):
        return DisplacementField(self.field[index])


class Composed(Transform):
    """``outer ∘ inner``: ``inner`` is applied first."""

    def __init__(self, outer: Transform, inner: Transform):
        self.outer, self.inner = outer, inner

    def displacement(self, points):
        d_inner = self.inner.displacement(points)
        return d_inner + self.outer.displacement(points + d_inner)

    def displacement_on_grid(self, grid):
        d_inner = self.inner.displacement_on_grid(grid)
        return d_inner + self.outer.displacement(grid + d_inner)

    def take(self, index):
        return Composed(self.outer.take(index), self.inner.take(index))


def exp_velocity(velocity: torch.Tensor, squarings: int = 7) -> DisplacementField:
    """The map ``exp(v)`` of a stationary velocity ``(N, d, *shape)`` (domain units) by scaling and
    squaring: ``D = v / 2^K``, then ``K`` times ``D <- D + D∘(Id + D)``. ``exp_velocity(-v)`` is its
    inverse; each squaring composes a map with itself, so a small first step gives a diffeomorphism."""
    grid = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype)
    field = velocity / 2**squarings
    for _ in range(squarings):
        field = field + sample(field, grid + field)
    return DisplacementField(field)


def map_on_grid(transform: Transform, shape, like: torch.Tensor) -> torch.Tensor:
    """The map evaluated at the grid of ``shape``: points ``(N, d, *shape)`` (batch of ``like``)."""
    grid = identity_grid(shape, like.device, like.dtype).expand(like.shape[0], len(shape), *shape)
    return grid + transform.displacement_on_grid(grid)


def warp(image: torch.Tensor, transform: Transform, shape=None, mode: str = "bilinear") -> torch.Tensor:
    """``image ∘ Φ`` sampled on the grid of ``shape`` (default: the image's own shape).

    Use ``mode="nearest"`` for label maps; labels are sampled as floats and keep their values.
    """
    shape = tuple(shape or image.shape[2:])
    if isinstance(transform, Identity) and shape == tuple(image.shape[2:]):
        return image
    return sample(image, map_on_grid(transform, shape, image), mode=mode)
