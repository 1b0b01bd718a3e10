"""A registration evaluated at every voxel of the fixed image: what its outputs are written from.

At a voxel ``x`` of the fixed image (a domain point, :mod:`cyclereg.core.coords`) the whole map is
``y = T(P(Φ(u)))``: ``u = A x + a`` is the voxel in the model grid's domain, ``Φ = Id + D`` the model's
map there, ``P`` the model grid's domain -> physical affine map and ``T`` the pair's affine stage. Every
change of frame is affine, so it acts on ``D``'s values alone: before ``T``, the physical displacement is
``G D(u)`` (``G`` the linear part of ``P``), and ``y`` in the moving image's domain is ``B x + b + M D(u)``
(``B x + b`` the frames without ``Φ``, ``M`` the linear part from the model grid's domain to the moving
image's). ``D`` is evaluated at the voxels once, both linear maps applied to it.

When ``Φ`` is a field on the model grid (field refinement, registration without a network) and the model
grid's axes are the fixed image's (``A`` diagonal: the grid is built from the fixed image), the linear maps
act on the field's nodes and the field is interpolated one axis at a time
(:func:`~cyclereg.core.transforms.sample_axes`, small matrices) instead of at the 16.7 million points of a
256³ image. Otherwise (a network's composed fields: the outer field must be sampled where the inner one
moves the voxels, and evaluating the inner one axis by axis saved nothing measurable) ``Φ`` is called on
every voxel. Physical points and the Jacobian are computed when first read.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from cyclereg.core.coords import identity_grid
from cyclereg.core.metrics import displacement_determinant
from cyclereg.core.transforms import DisplacementField, sample_axes
from cyclereg.io.images import Geometry

__all__ = ["OnFixedGrid", "on_fixed_grid"]


class OnFixedGrid:
    """A registration at the fixed image's voxels: tensors ``(1, d, *fixed shape)``, float32."""

    def __init__(self, fixed: Geometry, moving: Geometry, moving_domain: torch.Tensor,
                 aligned_displacement: torch.Tensor, affine_det: float):
        self._fixed, self._moving, self._affine_det = fixed, moving, affine_det
        self.moving_domain = moving_domain  # y in the moving image's [0, 1] domain
        self.aligned_displacement = aligned_displacement  # Φ(x) - x in physical space, before the affine stage

    @cached_property
    def fixed_physical(self) -> torch.Tensor:
        """x: the voxels' physical points."""
        shape = self.moving_domain.shape[2:]
        return self._fixed.to_physical(identity_grid(shape, self.moving_domain.device, torch.float32))

    @cached_property
    def aligned_physical(self) -> torch.Tensor:
        """Φ(x): in the fixed image's frame, before the affine transform."""
        return self.fixed_physical + self.aligned_displacement

    @cached_property
    def moving_physical(self) -> torch.Tensor:
        """y = T(Φ(x)): the moving image's physical points the voxels map to."""
        return self._moving.to_physical(self.moving_domain)

    def domain_of(self, image: Geometry) -> torch.Tensor:
        """y in the ``[0, 1]`` domain of an image of the moving space (the moving image's label map): the
        moving image's own domain points when ``image`` lies on its grid, else through physical space."""
        if image == self._moving:
            return self.moving_domain
        return image.from_physical(self.moving_physical.double())

    @property
    def displacement(self) -> torch.Tensor:
        """The whole map's displacement ``y - x``, the affine transform folded in."""
        return self.moving_physical - self.fixed_physical

    @cached_property
    def det(self) -> torch.Tensor:
        """``(1, *(shape - 1))``: the Jacobian determinant of x -> y (physical volume change), in the fixed
        image's own frame: a reflection between two images' index orders is a property of their grids,
        not a fold. T is affine: it scales every determinant by det L."""
        to_domain = np.linalg.inv(self._fixed.affine()[0])
        return displacement_determinant(_linear(to_domain, self.aligned_displacement)) * self._affine_det

    def det_per_voxel(self) -> torch.Tensor:
        """``det`` on every voxel of the fixed image (the last cell's value repeated at the far edges)."""
        return F.pad(self.det[:, None], [0, 1] * (self.det.ndim - 1), mode="replicate")[0, 0]


@torch.no_grad()
def on_fixed_grid(reg, device=None) -> OnFixedGrid:
    """The map of ``reg`` (a :class:`~cyclereg.registration.register.Registration`) at every voxel of the
    fixed image, as the module says; every frame change is composed in float64 and applied in float32."""
    g_fixed, g_moving = Geometry.of(reg.pair.fixed), reg.pair.moving_geometry()
    shape, d = tuple(reversed(g_fixed.size)), g_fixed.dim
    a, o = g_fixed.affine_to(reg.grid)
    maps = np.concatenate([reg.grid.affine_to(None)[0], reg.grid.affine_to(g_moving)[0]])  # G over M
    unit = [torch.linspace(0, 1, n, dtype=torch.float64) for n in shape]  # the fixed voxels along each axis
    if isinstance(reg.phi, DisplacementField) and _diagonal(a):
        axes = [(u * a[k, k] + o[k]).float().to(device) for k, u in enumerate(unit)]
        both = sample_axes(_linear(maps, reg.phi.field.to(device)), axes)  # the frame changes on the coarse field
    else:
        u = g_fixed.points_to(identity_grid(shape, device, torch.float32), reg.grid)
        both = _linear(maps, reg.phi.displacement(u))
    _add_affine(both[:, d:], *g_fixed.affine_to(g_moving), unit)  # the frames alone: fixed domain -> moving domain
    return OnFixedGrid(g_fixed, Geometry.of(reg.pair.moving), both[:, d:], both[:, :d], reg.pair.affine_det())


def _add_affine(out: torch.Tensor, matrix: np.ndarray, offset: np.ndarray, unit) -> None:
    """``out (1, d, *shape) += matrix @ x + offset`` at every node ``x`` of the identity grid whose axes are
    ``unit`` (float64 coordinates in [0, 1]): per component, the terms of all axes but the last summed on
    their smaller grid (float64), then two broadcast additions (no grid of points)."""
    d = len(unit)
    for i in range(out.shape[1]):
        terms = [(matrix[i, k] * u).view([-1 if j == k else 1 for j in range(d)]) for k, u in enumerate(unit)]
        leading = sum(terms[1:-1], terms[0] + offset[i])
        out[0, i].add_(leading.to(out.device, out.dtype)).add_(terms[-1].to(out.device, out.dtype))


def _diagonal(matrix: np.ndarray) -> bool:
    return bool(np.abs(matrix - np.diag(np.diag(matrix))).max() <= 1e-9 * np.abs(matrix).max())


def _linear(matrix: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """``matrix @ v`` at every point of a field ``(N, d, *S)``: ``(N, rows, *S)``."""
    m = torch.tensor(matrix, dtype=field.dtype, device=field.device)
    return torch.einsum("ij,nj...->ni...", m, field)
