"""Registering one pair: tensors in, a transform out; files in, files out.

The model sees both images resampled to the shape it was trained on, with intensities normalised to
its training range; the resulting map lives on the ``[0, 1]`` domain (:mod:`cyclereg.coords`), so it
is evaluated on the fixed image's own grid and applied to the moving image at its own resolution.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
import torch
import torch.nn.functional as F

from .coords import identity_grid
from .errors import DataError, UsageError
from .image_io import Geometry, image_to_tensor, read_image, write_displacement, write_image
from .methods import LossSettings, loss_terms, settings_from_config
from .metrics import jacobian_determinant
from .transforms import Transform, map_on_grid, sample

__all__ = ["normalise", "resize", "instance_optimisation", "register_tensors", "register_files"]


def normalise(image: torch.Tensor, intensity, role: str = "image") -> torch.Tensor:
    """Map the image's minimum and maximum to the model's training range ``intensity = (low, high)``."""
    lo, hi = image.min(), image.max()
    if not hi > lo:
        raise DataError(f"{role} is constant (every voxel {float(lo):g}); nothing to register")
    low, high = intensity
    return low + (image - lo) / (hi - lo) * (high - low)


def resize(image: torch.Tensor, shape) -> torch.Tensor:
    """Resample to ``shape`` keeping the ``[0, 1]`` domain (corner voxels stay in place)."""
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    mode = "bilinear" if image.ndim == 4 else "trilinear"
    return F.interpolate(image, size=tuple(shape), mode=mode, align_corners=True)


@contextlib.contextmanager
def instance_optimisation(model, moving, fixed, settings: LossSettings, steps: int, lr: float = 2e-4):
    """Fine-tune ``model`` on one pair for ``steps`` Adam steps with its training loss (batch norm
    in evaluation mode), yield it, then restore the original weights whatever happens."""
    saved = copy.deepcopy(model.state_dict())
    try:
        if steps > 0:
            model.eval()
            params = [p for p in model.parameters()]
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=lr)
            with torch.enable_grad():
                for _ in range(steps):
                    loss, _ = loss_terms(model, moving, fixed, settings)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        yield model
    finally:
        model.load_state_dict(saved)
        model.eval()


def register_tensors(model, info, moving: torch.Tensor, fixed: torch.Tensor, io_steps: int = 0,
                     io_lr: float = 2e-4) -> Transform:
    """``Φ_AB`` for tensors ``(1, 1, *spatial)`` of any size; intensities are normalised here."""
    device = next(model.parameters()).device
    m = resize(normalise(moving, info.intensity, "--moving"), info.shape).to(device)
    f = resize(normalise(fixed, info.intensity, "--fixed"), info.shape).to(device)
    with instance_optimisation(model, m, f, settings_from_config(info.config.model), io_steps, io_lr) as tuned, torch.no_grad():
        return tuned(m, f)


def register_files(model, info, fixed, moving, warped=None, transform=None, jacobian=None,
                   moving_labels=None, warped_labels=None, io_steps: int = 0, io_lr: float = 2e-4) -> dict:
    """Register the files ``moving`` to ``fixed`` with a trained model and write the requested
    outputs in the fixed image's space. Returns a summary (folds, Jacobian range)."""
    if io_steps < 0:
        raise UsageError(f"--io-steps: expected a number of steps >= 0, got {io_steps}")
    pair = read_pair(fixed, moving, moving_labels, warped_labels, dim=info.dim)
    phi = register_tensors(model, info, pair.moving, pair.fixed, io_steps, io_lr)
    device = next(model.parameters()).device
    return write_outputs(pair, phi, device, warped=warped, transform=transform, jacobian=jacobian, warped_labels=warped_labels)


@dataclass
class Pair:
    """A fixed and a moving image read from files, with their tensors (and optional moving labels)."""

    fixed_image: object
    moving_image: object
    fixed: torch.Tensor
    moving: torch.Tensor
    labels_image: object = None


def read_pair(fixed, moving, moving_labels=None, warped_labels=None, dim: int | None = None) -> Pair:
    """Read and check a pair of image files (and the moving image's labels)."""
    if (moving_labels is None) != (warped_labels is None):
        raise UsageError("--moving-labels and --warped-labels go together")
    fixed_img, moving_img = read_image(fixed, "--fixed"), read_image(moving, "--moving")
    labels_img = read_image(moving_labels, "--moving-labels") if moving_labels else None
    dim = dim or fixed_img.GetDimension()
    for role, img in (("--fixed", fixed_img), ("--moving", moving_img), ("--moving-labels", labels_img)):
        if img is not None and img.GetDimension() != dim:
            raise DataError(f"{role} is {img.GetDimension()}D but the model registers {dim}D images")
    if labels_img is not None and labels_img.GetSize() != moving_img.GetSize():
        raise DataError(f"--moving-labels has size {labels_img.GetSize()}, the moving image {moving_img.GetSize()}")
    return Pair(fixed_img, moving_img, image_to_tensor(fixed_img, f"--fixed {fixed}"),
                image_to_tensor(moving_img, f"--moving {moving}"), labels_img)


def write_outputs(pair: Pair, phi: Transform, device, warped=None, transform=None, jacobian=None, warped_labels=None) -> dict:
    """Write the outputs of a registration ``phi`` (domain coordinates) on the fixed image's grid."""
    f, m = pair.fixed, pair.moving
    with torch.no_grad():
        points = map_on_grid(phi, f.shape[2:], f.to(device)).cpu()
        g_fixed, g_moving = Geometry.of(pair.fixed_image), Geometry.of(pair.moving_image)
        # Volume change in physical space; a reflection between the two images' index orders (opposite
        # direction handedness) is a property of the grids, not a fold, so folds use the domain map.
        det_domain = jacobian_determinant(points)
        det = det_domain * abs(g_moving.extent_volume() / g_fixed.extent_volume())
        summary = {"folds": int((det_domain < 0).sum()), "jacobian_min": float(det.min()), "jacobian_max": float(det.max())}
        if warped:
            write_image(warped, sample(m, points)[0, 0], pair.fixed_image, pair.moving_image.GetPixelID())
        if warped_labels:
            lab = image_to_tensor(pair.labels_image, "--moving-labels")
            write_image(warped_labels, sample(lab, points, mode="nearest")[0, 0], pair.fixed_image, pair.labels_image.GetPixelID())
        if jacobian:
            padded = F.pad(det[:, None], [0, 1] * (f.ndim - 2), mode="replicate")[0, 0]
            write_image(jacobian, padded, pair.fixed_image, None)
        if transform:
            grid = identity_grid(f.shape[2:])
            displacement = g_moving.to_physical(points) - g_fixed.to_physical(grid)
            write_displacement(transform, displacement[0], pair.fixed_image)
    return summary

