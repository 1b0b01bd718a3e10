"""Regularisers of transforms and displacement fields (conventions: :mod:`cyclereg.core.coords`), one value
per batch item ``(N,)``. To keep the weights λ of the ICON papers meaningful, squared coordinate
errors are averaged over points *and* vector components, in domain units ``[0, 1]``, as the ICON
authors' code does; the diffusion term is VoxelMorph's, in voxels.
"""

from __future__ import annotations

import torch
from torch import nn

from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.core.metrics import forward_differences
from cyclereg.core.transforms import Transform

__all__ = ["random_points", "inverse_consistency", "gradient_inverse_consistency", "diffusion",
           "InverseConsistency", "GradientInverseConsistency", "Diffusion"]


def random_points(n: int, shape, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Grid points jittered by a Gaussian of one voxel's size per axis: ``(n, d, *shape)``.

    Drawn on ``device``; these are the off-grid points of the ICON paper (eq. 17).
    """
    grid = identity_grid(shape, device, dtype)
    step = 1.0 / voxel_scale(shape, device, dtype)
    noise = torch.randn((n, len(shape), *shape), device=device, dtype=dtype, generator=generator)
    return grid + noise * step


def inverse_consistency(phi_ab: Transform, phi_ba: Transform, points: torch.Tensor, noise: float = 0.0,
                        generator=None) -> torch.Tensor:
    """``‖Φ_AB ∘ Φ_BA − Id‖²`` at ``points``, in the displacement form ``D_AB∘Φ_BA + D_BA``.

    With ``noise = ε > 0`` (voxels), independent Gaussian noise of that size is added to each map
    before composing them (ICON paper §2.3). Returns the mean over points and components per item.
    """
    d_ba = phi_ba.displacement(points)
    if noise:
        step = noise / voxel_scale(points.shape[2:], points.device, points.dtype)
        d_ba = d_ba + step * torch.randn(points.shape, device=points.device, dtype=points.dtype, generator=generator)
    residual = d_ba + phi_ab.displacement(points + d_ba)
    if noise:
        residual = residual + step * torch.randn(points.shape, device=points.device, dtype=points.dtype, generator=generator)
    return residual.pow(2).flatten(1).mean(1)


def gradient_inverse_consistency(phi_ab: Transform, phi_ba: Transform, points: torch.Tensor,
                                 delta: float = 1e-3) -> torch.Tensor:
    """GradICON's term, as the authors' ``GradientICON`` (icon_registration) computes it: the Jacobian
    of the error ``Φ_AB ∘ Φ_BA − Id`` at ``points`` by forward differences of ``delta`` (domain units)
    along each axis, in domain units; per axis the mean of its squared entries over points and
    components, summed over axes. That is ``‖J‖²_F / d`` averaged over points. Zero for any pair of
    exactly inverse affine maps. One value per item."""
    d = points.shape[1]
    composed = phi_ab @ phi_ba
    base = composed.displacement(points)
    total = 0
    for k in range(d):
        offset = torch.zeros((1, d) + (1,) * d, device=points.device, dtype=points.dtype)
        offset[0, k] = delta
        shifted = composed.displacement(points + offset)
        total = total + ((shifted - base) / delta).pow(2).flatten(1).mean(1)
    return total


def diffusion(field: torch.Tensor) -> torch.Tensor:
    """``‖∇D‖²`` of a displacement field ``(N, d, *shape)`` by forward differences, in voxels per
    voxel, averaged over components, axes and the grid (as VoxelMorph's and CycleMorph's ``Grad``
    loss, so their λ carry over). Zero for a translation."""
    spatial = field.shape[2:]
    vox = field * voxel_scale(spatial, field.device, field.dtype)
    return sum(diff.pow(2).flatten(1).mean(1) for diff in forward_differences(vox)) / len(spatial)


class InverseConsistency(nn.Module):
    def __init__(self, noise: float = 0.0):
        super().__init__()
        self.noise = noise

    def forward(self, phi_ab, phi_ba, points):
        return inverse_consistency(phi_ab, phi_ba, points, self.noise).mean()


class GradientInverseConsistency(nn.Module):
    def __init__(self, delta: float = 1e-3):
        super().__init__()
        self.delta = delta

    def forward(self, phi_ab, phi_ba, points):
        return gradient_inverse_consistency(phi_ab, phi_ba, points, self.delta).mean()


class Diffusion(nn.Module):
    def forward(self, field):
        return diffusion(field).mean()
