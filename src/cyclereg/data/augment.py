"""Seeded data augmentation for training from few scans, with the ground-truth map of each pair.

Images are ``(N, C, *spatial)`` in 2D or 3D and maps pull back (:mod:`cyclereg.core.coords`). Every random
draw comes from a CPU ``torch.Generator`` passed in, so a run is reproducible and resumable; random
numbers are drawn on the CPU and then moved to the images' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cyclereg.core.coords import voxel_scale
from cyclereg.core.transforms import DisplacementField, Identity, Transform, exp_velocity, warp

__all__ = ["AffineMap", "random_affine_map", "random_velocity", "random_deformation",
           "random_flips_permutation", "apply_flips_permutation", "random_intensity", "AugmentSettings",
           "augment_pair"]


def _upsample(coarse: torch.Tensor, shape) -> torch.Tensor:
    """Cubic interpolation (PyTorch's bicubic kernel, one axis at a time) of a grid of nodes
    ``(N, C, *nodes)`` spanning the domain onto ``shape``; node values are kept at their positions."""
    out = coarse
    for k, n in enumerate(shape):
        m = coarse.shape[2 + k]
        impulses = torch.eye(m, device=coarse.device, dtype=coarse.dtype).view(m, 1, m, 1)
        weights = F.interpolate(impulses, size=(n, 1), mode="bicubic", align_corners=True).view(m, n)
        out = torch.tensordot(out, weights, dims=([2 + k], [0])).movedim(-1, 2 + k)
    return out


class AffineMap(Transform):
    """``Φ(p) = A p + b`` with ``matrix A (N, d, d)`` and ``shift b (N, d)`` in domain coordinates."""

    def __init__(self, matrix: torch.Tensor, shift: torch.Tensor):
        self.matrix, self.shift = matrix, shift

    def displacement(self, points):
        d = points.shape[1]
        points = points.expand(self.matrix.shape[0], *points.shape[1:])
        eye = torch.eye(d, device=points.device, dtype=points.dtype)
        linear = torch.einsum("nij,nj...->ni...", self.matrix - eye, points)
        return linear + self.shift.view(*self.shift.shape, *([1] * (points.ndim - 2)))

    def inverse(self) -> "AffineMap":
        """The exact inverse ``p -> A⁻¹ (p - b)``."""
        inv = torch.linalg.inv(self.matrix)
        return AffineMap(inv, -torch.einsum("nij,nj->ni", inv, self.shift))

    def take(self, index):
        return AffineMap(self.matrix[index], self.shift[index])


def random_affine_map(n: int, dim: int, strength: float, generator: torch.Generator, device=None,
                      dtype=torch.float32) -> AffineMap:
    """A random affine map (the one :func:`cyclereg.data.datasets.random_affine` warps with): ``p -> (I + s·E)(p - c) + c + t``
    about the centre ``c``, ``E`` standard normal ``d × d``, ``t`` normal of std ``s / 2`` (domain units).
    Keep ``strength`` small (about 0.1 or less) so that ``I + s·E`` stays well conditioned."""
    matrix = torch.eye(dim) + strength * torch.randn(n, dim, dim, generator=generator)
    shift = 0.5 * strength * torch.randn(n, dim, generator=generator)
    shift = shift + 0.5 - torch.einsum("nij,j->ni", matrix, torch.full((dim,), 0.5))
    return AffineMap(matrix.to(device, dtype), shift.to(device, dtype))


def random_velocity(n: int, shape, magnitude: float, smoothness: int, generator: torch.Generator, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """A smooth random stationary velocity field ``(n, d, *shape)`` in domain units.

    Gaussian values on a control grid of ``smoothness`` nodes per axis, isotropic in voxels, are
    interpolated (cubic) onto ``shape``; each field is then scaled so that its vectors have an RMS length
    of exactly ``magnitude`` voxels. The component normal to each face of the domain is zero there, so
    the flow slides along the border and ``exp(v)`` maps the domain onto itself.
    """
    shape = tuple(int(s) for s in shape)
    if smoothness < 2:
        raise ValueError(f"random_velocity: smoothness must be at least 2 control nodes per axis, got {smoothness}")
    d = len(shape)
    coarse = torch.randn(n, d, *([smoothness] * d), generator=generator, dtype=torch.float64)
    for k in range(d):
        coarse[:, k].select(k + 1, 0).zero_()
        coarse[:, k].select(k + 1, -1).zero_()
    field = _upsample(coarse.to(device, dtype), shape)
    rms = field.square().sum(1).flatten(1).mean(1).sqrt().clamp(min=1e-12).view(n, *([1] * (d + 1)))
    return field * (magnitude / rms) / voxel_scale(shape, device, dtype)


def random_deformation(n: int, shape, magnitude: float, smoothness: int, generator: torch.Generator, device=None,
                       dtype=torch.float32) -> tuple[DisplacementField, DisplacementField]:
    """A random diffeomorphism ``exp(v)`` and its inverse ``exp(-v)`` (see :func:`random_velocity`)."""
    v = random_velocity(n, shape, magnitude, smoothness, generator, device, dtype)
    return exp_velocity(v), exp_velocity(-v)


def random_flips_permutation(dim: int, generator: torch.Generator, flips: bool = True, permute: bool = False) -> tuple:
    """A random ``(flipped, order)``: ``flipped[k]`` says whether spatial axis ``k`` is reversed (each
    with probability 1/2), ``order`` is a random permutation of the axes (the identity unless ``permute``)."""
    flipped = tuple(bool(b) for b in torch.rand(dim, generator=generator) < 0.5) if flips else (False,) * dim
    order = tuple(int(k) for k in torch.randperm(dim, generator=generator)) if permute else tuple(range(dim))
    return flipped, order


def apply_flips_permutation(images: torch.Tensor, spec: tuple) -> torch.Tensor:
    """Flip the spatial axes ``k`` with ``flipped[k]``, then make output axis ``k`` the input axis
    ``order[k]``. The permutation may only exchange axes of equal size (the shape never changes)."""
    flipped, order = spec
    spatial = images.shape[2:]
    if any(spatial[k] != spatial[o] for k, o in enumerate(order)):
        raise ValueError(f"apply_flips_permutation: order {order} exchanges axes of different sizes in {tuple(spatial)}")
    out = images.flip([2 + k for k, f in enumerate(flipped) if f])
    return out.permute(0, 1, *(2 + o for o in order))


def random_intensity(images: torch.Tensor, generator: torch.Generator, gamma: float = 0.3, scale: float = 0.1,
                     noise: float = 0.02, bias: float = 0.0) -> torch.Tensor:
    """A new tensor: images assumed in ``[0, 1]`` (clamped first) raised, per batch item, to the power
    ``exp(gamma·z)``, multiplied by a uniform factor in ``1 ± scale`` and by a smooth log-normal bias field
    (std ``bias`` in log space, 4 control nodes per axis), plus Gaussian noise of std ``noise``.
    The result is not clamped; with all strengths 0 the clamped input is returned."""
    n, d, dev = images.shape[0], images.ndim - 2, images.device
    per_item = (n,) + (1,) * (d + 1)
    out = images.clamp(0.0, 1.0)
    if gamma:
        out = out ** torch.exp(gamma * torch.randn(per_item, generator=generator)).to(dev, images.dtype)
    if scale:
        out = out * (1 + scale * (2 * torch.rand(per_item, generator=generator) - 1)).to(dev, images.dtype)
    if bias:
        log_field = _upsample(torch.randn(n, 1, *([4] * d), generator=generator).to(dev, images.dtype), images.shape[2:])
        out = out * torch.exp(bias * log_field)
    if noise:
        out = out + noise * torch.randn(images.shape, generator=generator).to(dev, images.dtype)
    return out


@dataclass(frozen=True)
class AugmentSettings:
    """What :func:`augment_pair` does: deformation RMS in voxels (0: none) and its control nodes per axis,
    affine strength (0: none), flips, axis permutation (square or cubic images only), intensity changes."""

    deform: float = 0.0
    smoothness: int = 5
    affine: float = 0.0
    flips: bool = False
    permute: bool = False
    intensity: bool = False


def _random_map(images, settings, generator) -> tuple[Transform, Transform]:
    """A random map ``affine ∘ exp(v)`` (pull back) for a batch, and its inverse."""
    n, shape, dev, dt = images.shape[0], images.shape[2:], images.device, images.dtype
    forward, inverse = Identity(), Identity()
    if settings.affine:
        affine = random_affine_map(n, len(shape), settings.affine, generator, dev, dt)
        forward, inverse = affine, affine.inverse()
    if settings.deform:
        phi, phi_inv = random_deformation(n, shape, settings.deform, settings.smoothness, generator, dev, dt)
        forward, inverse = forward @ phi, phi_inv @ inverse
    return forward, inverse


def augment_pair(moving: torch.Tensor, fixed: torch.Tensor, settings: AugmentSettings,
                 generator: torch.Generator, labels: tuple | None = None) -> tuple:
    """Augment a batch of pairs; returns ``(moving_aug, fixed_aug, truth)``, and with ``labels =
    (moving_labels, fixed_labels)`` (integer label maps of the images) ``(moving_aug, fixed_aug, truth,
    (moving_labels_aug, fixed_labels_aug))``, the label maps warped as their images, by nearest neighbour.

    Both images get the same flips/permutation, then each its own random map ``T = affine ∘ exp(v)``
    (``image_aug = image ∘ T``), then each its own intensity changes. ``truth = T_m⁻¹ ∘ T_f`` takes each
    fixed-domain point to the moving-domain point showing the same anatomy, so that
    ``warp(moving_aug, truth) ≈ fixed_aug``. It is exact only when ``moving`` and ``fixed`` are themselves
    aligned (the same scan), which is how a population of pairs is built from one subject. Labels draw
    nothing from ``generator``: the images' augmentation is the same with or without them.
    """
    if moving.shape != fixed.shape:
        raise ValueError(f"augment_pair: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ in shape")
    spatial = moving.shape[2:]
    if settings.permute and len(set(spatial)) != 1:
        raise ValueError(f"augment_pair: permute needs a square or cubic image, got spatial shape {tuple(spatial)}")
    spec = random_flips_permutation(len(spatial), generator, settings.flips, settings.permute)
    moving, fixed = apply_flips_permutation(moving, spec), apply_flips_permutation(fixed, spec)
    forward_m, inverse_m = _random_map(moving, settings, generator)
    forward_f, _ = _random_map(fixed, settings, generator)
    moving, fixed = warp(moving, forward_m), warp(fixed, forward_f)
    if settings.intensity:
        moving, fixed = random_intensity(moving, generator), random_intensity(fixed, generator)
    if labels is None:
        return moving, fixed, inverse_m @ forward_f
    warped_labels = tuple(warp(apply_flips_permutation(lab, spec).float(), forward, mode="nearest").to(lab.dtype)
                          for lab, forward in zip(labels, (forward_m, forward_f)))
    return moving, fixed, inverse_m @ forward_f, warped_labels
