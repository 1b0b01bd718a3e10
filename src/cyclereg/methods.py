"""Registration models (one network or a composition of steps) and the training losses of the
methods ICON, GradICON and the diffusion-regularised baseline.

A model is called as ``model(moving, fixed)`` and returns the transform ``Φ_AB`` with
``moving ∘ Φ_AB ≈ fixed`` (conventions: :mod:`cyclereg.coords`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .losses import SIMILARITIES, _gaussian_blur, diffusion, gradient_inverse_consistency, inverse_consistency, random_points
from .coords import identity_grid
from .networks import build_network
from .transforms import DisplacementField, Transform, map_on_grid, warp

__all__ = ["Step", "RegistrationModel", "LossSettings", "METHODS", "loss_terms", "build_model"]


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Smooth and resample ``(N, C, *spatial)`` to ``(n - 1) // factor + 1`` voxels per axis, keeping
    the corner voxels where they are, so the ``[0, 1]`` domain is unchanged."""
    if factor == 1:
        return images
    size = [(n - 1) // factor + 1 for n in images.shape[2:]]
    smooth = _gaussian_blur(images, 0.5 * factor)
    return F.interpolate(smooth, size=size, mode="bilinear" if images.ndim == 4 else "trilinear", align_corners=True)


class Step(nn.Module):
    """One network predicting a displacement field, optionally on images downsampled by ``factor``
    (the field is then evaluated at full resolution by interpolation)."""

    def __init__(self, network: nn.Module, factor: int = 1):
        super().__init__()
        self.network, self.factor = network, factor

    def forward(self, moving, fixed) -> DisplacementField:
        pair = downsample(torch.cat([moving, fixed], 1), self.factor)
        return DisplacementField(self.network(pair))


class RegistrationModel(nn.Module):
    """A composition of steps: step ``k`` sees the moving image warped by steps ``0..k-1``, and the
    result is ``Φ = Φ_0 ∘ Φ_1 ∘ ... ∘ Φ_{K-1}`` (the last step is applied to points first)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.frozen: set[int] = set()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Transform:
        phi = None
        for step in self.steps:
            psi = step(moving if phi is None else warp(moving, phi), fixed)
            phi = psi if phi is None else phi @ psi
        return phi

    def freeze(self, trainable) -> None:
        """Train only the steps whose indices are in ``trainable``; the others are frozen (no
        gradients, batch norm in evaluation mode)."""
        trainable = set(trainable)
        self.frozen = set(range(len(self.steps))) - trainable
        for i, step in enumerate(self.steps):
            step.requires_grad_(i in trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for i in self.frozen:
            self.steps[i].train(False)
        return self


@dataclass(frozen=True)
class LossSettings:
    method: str = "icon"
    similarity: str = "mse"
    lam: float = 1.0
    noise: float = 0.0
    sigma: float = 2.0


def _icon(phi, swapped, shape, like, settings):
    points = random_points(like.shape[0], shape, like.device, like.dtype)
    return inverse_consistency(swapped, phi, points, settings.noise)


def _gradicon(phi, swapped, shape, like, settings):
    points = random_points(like.shape[0], shape, like.device, like.dtype)
    return gradient_inverse_consistency(swapped, phi, points)


def _diffusion(phi, swapped, shape, like, settings):
    return diffusion(map_on_grid(phi, shape, like) - identity_grid(shape, like.device, like.dtype))

# name -> (symmetric: both directions in one batch, regulariser name, regulariser)
METHODS = {
    "icon": (True, "icon", _icon),
    "gradicon": (True, "gradicon", _gradicon),
    "diffusion": (False, "diffusion", _diffusion),
}


def loss_terms(model: RegistrationModel, moving: torch.Tensor, fixed: torch.Tensor, settings: LossSettings):
    """The training loss of ``settings.method`` on a batch of pairs.

    Symmetric methods run A→B and B→A as one batch of ``2N`` through the network; their terms are
    sums over both directions, averaged over the ``N`` pairs. Returns ``(total, {term: value})``.
    """
    symmetric, reg_name, regulariser = METHODS[settings.method]
    a, b = (torch.cat([moving, fixed]), torch.cat([fixed, moving])) if symmetric else (moving, fixed)
    phi = model(a, b)
    similarity = SIMILARITIES[settings.similarity]
    kwargs = {"sigma": settings.sigma} if settings.similarity == "lncc" else {}
    sim = similarity(warp(a, phi), b, **kwargs)
    n = moving.shape[0]
    swapped = phi.take(torch.arange(2 * n, device=a.device).roll(n)) if symmetric else None
    reg = regulariser(phi, swapped, b.shape[2:], b, settings)
    weight = 2.0 if symmetric else 1.0
    terms = {"sim": weight * sim.mean(), reg_name: weight * reg.mean()}
    total = terms["sim"] + settings.lam * terms[reg_name]
    return total, terms


def build_model(steps_config, dim: int, shape) -> RegistrationModel:
    """Build a model from step descriptions: ``[{"network": "unet", "downsample": 1, "params": {}}]``."""
    steps = []
    for spec in steps_config:
        factor = int(spec.get("downsample", 1))
        step_shape = tuple((n - 1) // factor + 1 for n in shape) if shape is not None else None
        steps.append(Step(build_network(spec["network"], dim, step_shape, **dict(spec.get("params", {}))), factor))
    return RegistrationModel(steps)
