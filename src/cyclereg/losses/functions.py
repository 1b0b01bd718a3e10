"""Loss functions, each a stateless function returning one value per batch item ``(N,)``, with a
thin :class:`torch.nn.Module` around it that averages over the batch.

Similarities compare a warped moving image with the fixed image ``(N, C, *spatial)`` (lower is
better; minimal for identical images, and 0 for them except for the local correlations, where flat
windows count as uncorrelated). Regularisers act on transforms or displacement fields in the
convention of :mod:`cyclereg.coords`. To keep the weights λ of the ICON paper meaningful, squared
coordinate errors are averaged over points *and* vector components, in domain units ``[0, 1]``, as
the ICON authors' code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.core.transforms import Transform

__all__ = [
    "mse", "ncc", "lncc", "lncc_box", "random_points", "inverse_consistency", "gradient_inverse_consistency", "diffusion",
    "MSE", "NCC", "LNCC", "InverseConsistency", "GradientInverseConsistency", "Diffusion", "SIMILARITIES",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def mse(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference per item."""
    return (warped - fixed).pow(2).flatten(1).mean(1)


def ncc(warped: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - NCC`` over the whole image per item: 0 for images equal up to an affine intensity map."""
    a, b = warped.flatten(1), fixed.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr = (a * b).mean(1) / torch.sqrt(a.pow(2).mean(1) * b.pow(2).mean(1)).clamp(min=eps)
    return 1 - corr


def separable_filter(x: torch.Tensor, kernel: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """``(N, C, *spatial)`` convolved with the 1D ``kernel`` (odd length) along every spatial axis in turn,
    output the size of the input. ``padding``: ``"zeros"`` (as ``padding="same"`` convolutions, the
    authors' LNCC and NCC) or ``"replicate"`` (edges repeated)."""
    n, c, *spatial = x.shape
    d, radius = len(spatial), kernel.numel() // 2
    out = x.reshape(n * c, 1, *spatial)
    kernel = kernel.to(x.device, x.dtype)
    for axis in range(d):
        shape = [1, 1] + [1] * d
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        padded = F.pad(out, pad, mode="constant" if padding == "zeros" else padding)
        out = _CONV[d](padded, kernel.view(shape))
    return out.reshape(n, c, *spatial)


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """A normalised Gaussian of ``sigma`` voxels sampled at ``-radius..radius``."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, C, *spatial)`` (edges replicated, 3σ support), used to
    smooth images before they are downsampled."""
    return separable_filter(x, gaussian_kernel(sigma, max(1, int(math.ceil(3 * sigma)))), "replicate")


def lncc(warped: torch.Tensor, fixed: torch.Tensor, sigma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean local NCC`` with a Gaussian window of ``sigma`` voxels, per item: the ICON authors'
    ``LNCC`` (icon_registration): a kernel of ``4σ + 1`` taps, zero padding, and ``eps`` added to each
    local variance. Windows that are flat in either image count as uncorrelated, so identical images
    with flat regions score above 0; identical images still score lowest."""
    kernel = gaussian_kernel(sigma, int(round(2 * sigma)))
    blur = lambda t: separable_filter(t, kernel)  # noqa: E731
    mu_a, mu_b = blur(warped), blur(fixed)
    var_a = torch.relu(blur(warped * warped) - mu_a * mu_a) + eps
    var_b = torch.relu(blur(fixed * fixed) - mu_b * mu_b) + eps
    local = (blur(warped * fixed) - mu_a * mu_b) / torch.sqrt(var_a * var_b)
    return 1 - local.flatten(1).mean(1)


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sums over a cubic window of ``window`` voxels about each voxel, zero outside the image (as the
    ``padding=window // 2`` convolutions of VoxelMorph and CycleMorph), one axis at a time."""
    return separable_filter(x, torch.ones(window), "zeros")


def lncc_box(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean squared local NCC`` over a box window of ``window`` voxels, per item: VoxelMorph's
    ``NCC`` loss (and CycleMorph's ``crossCorrelation3D``) plus 1: window sums with zero padding, and
    ``eps`` added to the product of the windows' sums of squared deviations. The sums are taken in
    float64: in float32 their expansion cancels to rounding noise on a background other than 0 (the
    authors' images have a background of 0, ours of -1 in ``[-1, 1]``), and that noise, divided by a
    small ``eps``, stops training."""
    size = window ** (warped.ndim - 2)
    dtype = warped.dtype
    warped, fixed = warped.double(), fixed.double()
    total = lambda t: box_sum(t, window)  # noqa: E731
    sum_a, sum_b = total(warped), total(fixed)
    mu_a, mu_b = sum_a / size, sum_b / size
    cross = total(warped * fixed) - mu_b * sum_a - mu_a * sum_b + mu_a * mu_b * size
    var_a = total(warped * warped) - 2 * mu_a * sum_a + mu_a * mu_a * size
    var_b = total(fixed * fixed) - 2 * mu_b * sum_b + mu_b * mu_b * size
    local = cross * cross / (var_a * var_b + eps)
    return (1 - local.flatten(1).mean(1)).to(dtype)


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
    total = 0
    for k in range(len(spatial)):
        total = total + torch.diff(vox, dim=2 + k).pow(2).flatten(1).mean(1)
    return total / len(spatial)


SIMILARITIES = {"mse": mse, "ncc": ncc, "lncc": lncc, "lncc_box": lncc_box}


class MSE(nn.Module):
    def forward(self, warped, fixed):
        return mse(warped, fixed).mean()


class NCC(nn.Module):
    def forward(self, warped, fixed):
        return ncc(warped, fixed).mean()


class LNCC(nn.Module):
    def __init__(self, sigma: float = 2.0):
        super().__init__()
        self.sigma = sigma

    def forward(self, warped, fixed):
        return lncc(warped, fixed, self.sigma).mean()


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
