"""CycleMorph's multi-scale scheme for volumes too large for memory (Kim et al., MedIA 2021):
a global registration of the whole image downsampled, then local refinement of overlapping
patches at full resolution, the patch fields blended into one smooth field.

The blend weights are a smooth bump per patch (a raised cosine that is zero at the patch border
and positive inside), normalised by their sum: a point's displacement is a convex combination of
the patches that cover it, with weights that vary smoothly, so no seam appears at patch borders.
Coordinates follow :mod:`cyclereg.core.coords`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cyclereg.models.registration import RegistrationModel, forward_model
from cyclereg.core.transforms import DisplacementField, Transform, warp

__all__ = ["patch_starts", "blend_weight", "refine_in_patches", "multiscale_register", "Patchwise", "random_patches"]


def patch_starts(n: int, patch: int, overlap: int) -> list[int]:
    """Start indices of patches of size ``patch`` covering ``0..n-1`` with at least ``overlap``."""
    if patch >= n:
        return [0]
    stride = max(1, patch - overlap)
    count = math.ceil((n - patch) / stride) + 1
    return [round(i * (n - patch) / (count - 1)) for i in range(count)]


def blend_weight(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(1, 1, *shape)`` raised-cosine bump: near 0 at the borders, 1 in the middle, positive."""
    weight = torch.ones((1, 1) + tuple(shape), device=device, dtype=dtype)
    for axis, n in enumerate(shape):
        t = (torch.arange(n, device=device, dtype=dtype) + 0.5) / n
        profile = 0.5 - 0.5 * torch.cos(2 * math.pi * t)
        view = [1] * (len(shape) + 2)
        view[axis + 2] = n
        weight = weight * profile.view(view)
    return weight


@torch.no_grad()
def refine_in_patches(step, moving: torch.Tensor, fixed: torch.Tensor, patch, overlap) -> DisplacementField:
    """Run a full-resolution step on overlapping patches and blend the patch fields.

    ``step(moving_patch, fixed_patch)`` returns a :class:`DisplacementField` in the patch's own
    ``[0, 1]`` domain; it is rescaled to the whole image's domain before blending. A step reads its
    network in voxels (:class:`cyclereg.models.registration.Step`), so a network trained on whole images predicts
    the same displacements on a patch.
    """
    shape = tuple(fixed.shape[2:])
    d = len(shape)
    patch = tuple(min(p, n) for p, n in zip(patch, shape))
    total = torch.zeros((fixed.shape[0], d) + shape, device=fixed.device, dtype=fixed.dtype)
    weights = torch.zeros((1, 1) + shape, device=fixed.device, dtype=fixed.dtype)
    scale = torch.tensor([(p - 1) / (n - 1) for p, n in zip(patch, shape)], device=fixed.device, dtype=fixed.dtype).view(1, d, *([1] * d))
    single = all(p == n for p, n in zip(patch, shape))
    w = torch.ones((1, 1) + patch, device=fixed.device, dtype=fixed.dtype) if single else blend_weight(patch, fixed.device, fixed.dtype)
    starts = [patch_starts(n, p, o) for n, p, o in zip(shape, patch, overlap)]
    for corner in _product(starts):
        region = (slice(None), slice(None)) + tuple(slice(c, c + p) for c, p in zip(corner, patch))
        field = step(moving[region], fixed[region]).field * scale
        total[region] += w * field
        weights[region] += w
    return DisplacementField(total / weights.clamp(min=1e-12))


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head,) + tail


@torch.no_grad()
def multiscale_register(model: RegistrationModel, moving: torch.Tensor, fixed: torch.Tensor, patch, overlap) -> Transform:
    """Register with a two-step model: step 0 (normally downsampled) on the whole image, step 1
    at full resolution on overlapping patches of the globally warped moving image. With one patch
    covering the image this equals ``model(moving, fixed)``. A CycleMorph model registers with ``g_ab``."""
    model = forward_model(model)
    if len(model.steps) != 2:
        raise ValueError(f"multiscale_register needs a model of two steps (global, local), got {len(model.steps)}")
    global_phi = model.steps[0](moving, fixed)
    local = refine_in_patches(model.steps[1], warp(moving, global_phi), fixed, patch, overlap)
    return global_phi @ local


class Patchwise(nn.Module):
    """A two-step model called like a model, run by :func:`multiscale_register` (``register --patch``).
    ``patch`` and ``overlap`` are in voxels of the model grid."""

    def __init__(self, model: nn.Module, patch, overlap):
        super().__init__()
        self.model, self.patch, self.overlap = model, tuple(patch), tuple(overlap)

    def forward(self, moving, fixed) -> Transform:
        return multiscale_register(self.model, moving, fixed, self.patch, self.overlap)


def random_patches(global_model, moving: torch.Tensor, fixed: torch.Tensor, patch):
    """Training pairs for a model's local steps (CycleMorph's local refinement): the moving images
    warped by ``global_model`` (its global steps, :func:`cyclereg.models.registration.split_steps`) on the
    whole images, then one random patch of ``patch`` voxels per pair, at the same place in both.

    Corners are drawn from torch's global generator, so a resumed run draws the same patches.
    """
    shape = tuple(fixed.shape[2:])
    if len(patch) != len(shape):
        raise ValueError(f"patch {list(patch)} has {len(patch)} sizes; the images have {len(shape)} dimensions")
    with torch.no_grad():
        warped = warp(moving, global_model(moving, fixed))
    size = [min(p, n) for p, n in zip(patch, shape)]
    pairs_m, pairs_f = [], []
    for i in range(fixed.shape[0]):
        corner = [int(torch.randint(n - p + 1, ())) for n, p in zip(shape, size)]
        region = (slice(i, i + 1), slice(None)) + tuple(slice(c, c + p) for c, p in zip(corner, size))
        pairs_m.append(warped[region])
        pairs_f.append(fixed[region])
    return torch.cat(pairs_m), torch.cat(pairs_f)
