"""Similarities of a warped moving image and the fixed image ``(N, C, *spatial)``: one value per batch
item ``(N,)``, lower is better, minimal for identical images (0 for them, except for the local
correlations, where flat windows count as uncorrelated). Each matches its authors' formula
(``benchmarks/test_reference_losses.py`` checks them against the installed packages).
"""

from __future__ import annotations

import torch
from torch import nn

from cyclereg.core.filters import box_sum, gaussian_kernel, separable_filter

__all__ = ["mse", "ncc", "lncc", "lncc_box", "SIMILARITIES", "MSE", "NCC", "LNCC"]


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


def lncc_box(warped: torch.Tensor, fixed: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean squared local NCC`` over a box window of ``window`` voxels, per item: VoxelMorph's
    ``NCC`` loss (and CycleMorph's ``crossCorrelation3D``) plus 1: window sums with zero padding, and
    ``eps`` added to the product of the windows' sums of squared deviations. The sums are taken in
    float64: in float32 their expansion cancels to rounding noise on a background other than 0 (the
    authors' images have a background of 0, ours of -1 in ``[-1, 1]``), and that noise, divided by a
    small ``eps``, stops training."""
    return lncc_box_to(fixed, window, eps)(warped)


def lncc_box_to(fixed: torch.Tensor, window: int = 9, eps: float = 1e-5):
    """:func:`lncc_box` against one ``fixed`` image, as a function of the warped image: the fixed image's
    window sums are taken once (an optimisation of one pair evaluates it at every step)."""
    size = window ** (fixed.ndim - 2)
    fixed = fixed.double()
    total = lambda t: box_sum(t, window)  # noqa: E731
    sum_b = total(fixed)
    mu_b = sum_b / size
    var_b = total(fixed * fixed) - 2 * mu_b * sum_b + mu_b * mu_b * size

    def loss(warped: torch.Tensor) -> torch.Tensor:
        dtype, warped = warped.dtype, warped.double()
        sum_a = total(warped)
        mu_a = sum_a / size
        cross = total(warped * fixed) - mu_b * sum_a - mu_a * sum_b + mu_a * mu_b * size
        var_a = total(warped * warped) - 2 * mu_a * sum_a + mu_a * mu_a * size
        local = cross * cross / (var_a * var_b + eps)
        return (1 - local.flatten(1).mean(1)).to(dtype)

    return loss


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
