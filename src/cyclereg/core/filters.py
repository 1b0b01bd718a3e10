"""Separable filters of images ``(N, C, *spatial)``, 2D and 3D: one axis at a time, output the size of the input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["separable_filter", "gaussian_kernel", "gaussian_blur", "box_sum"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sums over a cubic window of ``window`` voxels (odd) about each voxel, zero outside the image (as the
    ``padding=window // 2`` convolutions of VoxelMorph and CycleMorph), one axis at a time, each as the
    difference of a running sum: the same values as the convolution (use float64 for long sums), and on
    CPU in float64, where torch has no fast convolution, several times faster."""
    radius = window // 2
    out = x
    for axis in range(2, x.ndim):
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - axis)], pad[2 * (x.ndim - 1 - axis) + 1] = radius + 1, radius
        running = F.pad(out, pad).cumsum(axis)
        n = out.shape[axis]
        out = running.narrow(axis, window, n) - running.narrow(axis, 0, n)
    return out
