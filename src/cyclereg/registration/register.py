"""Registering one pair: files in, a map in physical space, files out on the fixed image's grid.

First the affine stage (:func:`align`): an affine transform ``T`` from the fixed image's space to the
moving image's, found by :mod:`cyclereg.registration.affine` (``auto``), read from a file, or none. The
moving image is seen from the fixed image's frame through ``T`` (:meth:`Geometry.seen_through`), so the
deformable model runs on the affinely aligned pair and the whole map is ``T∘Φ``.

Both images are resampled onto the fixed image's model grid (:mod:`cyclereg.io.preprocess`); the model's
map ``Φ`` lives on that grid's ``[0, 1]`` domain (:mod:`cyclereg.core.coords`). To carry it back, every
voxel ``x`` of the fixed image is taken to physical space, into the model grid's domain, through
``Φ``, and back to a physical point ``y``: ``y - x`` is the ITK displacement field (fixed point plus
displacement = moving point), and the moving image is sampled at ``y`` with ITK's rules (linear or
nearest, inside the buffer up to half a voxel beyond the edge centres, 0 outside), so SimpleITK's
resampler and ANTs give the same warped image from the written transform.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cyclereg.core.coords import identity_grid
from cyclereg.core.distributed import default_device
from cyclereg.core.errors import DataError, UsageError
from cyclereg.core.atomic import all_or_nothing
from cyclereg.io.images import Geometry, image_to_tensor, read_image, save_image, write_image
from cyclereg.io.transforms import (affine_parts, affine_transform, displacement_transform, is_transform_file,
                                    node_field_transform, one_transform, read_affine, read_transform,
                                    write_displacement, write_transform)
from cyclereg.core.label_metrics import folded_percent
from cyclereg.core.metrics import folded
from cyclereg.io.preprocess import Preprocessing, model_grid, prepare
from cyclereg.core.transforms import DisplacementField, Transform, sample
from cyclereg.registration import networkfree
from cyclereg.registration.fixed_grid import OnFixedGrid, on_fixed_grid
from cyclereg.registration.instance import register_tensors
from cyclereg.registration.tuning import NO_IO, InstanceOptimisation

__all__ = ["Pair", "read_pair", "align", "Registration", "model_inputs", "device_for", "register_pair", "map_physical", "inverse_transform", "sample_like_itk", "warp_image", "warp_labels", "write_outputs",
           "register_files", "warp_file"]


@dataclass
class Pair:
    """A fixed and a moving image (SimpleITK), with the moving image's optional label map."""

    fixed: sitk.Image
    moving: sitk.Image
    moving_labels: sitk.Image | None = None
    fixed_name: str = "--fixed"  # how errors name the images: the option and the file
    moving_name: str = "--moving"
    affine: sitk.AffineTransform | None = None  # T: fixed image's points -> moving image's points
    affine_summary: dict | None = None  # how the affine stage found T

    def reversed(self) -> "Pair":
        inverse = None
        if self.affine is not None:
            linear, offset = affine_parts(self.affine)
            inverse = affine_transform(np.linalg.inv(linear), -np.linalg.inv(linear) @ offset)
        return Pair(self.moving, self.fixed, fixed_name=self.moving_name, moving_name=self.fixed_name, affine=inverse)

    def moving_geometry(self) -> Geometry:
        """The moving image's geometry seen from the fixed image's frame (through ``affine``)."""
        own = Geometry.of(self.moving)
        return own if self.affine is None else own.seen_through(*affine_parts(self.affine))

    def affine_det(self) -> float:
        return 1.0 if self.affine is None else float(np.linalg.det(affine_parts(self.affine)[0]))


def read_pair(fixed, moving, moving_labels=None, dim: int | None = None, names=("--fixed", "--moving", "--moving-labels")) -> Pair:
    """Read and check a pair of image files (and the moving image's labels), or take SimpleITK images
    as they are. ``dim`` is the model's dimension; ``names`` are the options (or CSV columns) that
    errors name beside the files."""
    def image(source, role):
        return source if isinstance(source, sitk.Image) else read_image(source, role)

    fixed_img, moving_img = image(fixed, names[0]), image(moving, names[1])
    labels_img = image(moving_labels, names[2]) if moving_labels is not None else None
    fixed, moving, moving_labels = (x if not isinstance(x, sitk.Image) else "(a SimpleITK image)"
                                    for x in (fixed, moving, moving_labels))
    expected = dim or fixed_img.GetDimension()
    for role, path, img in zip(names, (fixed, moving, moving_labels), (fixed_img, moving_img, labels_img)):
        if img is not None and img.GetDimension() != expected:
            against = f"the model registers {dim}D images" if dim else f"{names[0]} is {expected}D"
            raise DataError(f"{role} {path} is {img.GetDimension()}D but {against}")
    if labels_img is not None:
        _check_labels_grid(labels_img, moving_img, f"{names[2]} {moving_labels}")
        labels = sitk.GetArrayViewFromImage(labels_img)
        if labels.dtype.kind == "f" and not (labels == labels.round()).all():
            raise DataError(f"{names[2]} {moving_labels} holds non-integer values; expected a label map")
    return Pair(fixed_img, moving_img, labels_img, f"{names[0]} {fixed}", f"{names[1]} {moving}")


def align(pair: Pair, affine="auto", similarity: str = "ncc", device=None, option: str = "--affine") -> Pair:
    """The pair with its affine stage: ``affine`` is ``"auto"`` (:func:`~cyclereg.registration.affine.affine_register`
    with ``similarity``), ``"none"`` (the images are aligned already), an ITK transform file or a
    SimpleITK transform (fixed points to moving points)."""
    import time

    from dataclasses import replace

    from cyclereg.registration.affine import affine_register

    dim = pair.fixed.GetDimension()
    if isinstance(affine, str) and affine == "none":
        return pair
    if isinstance(affine, str) and affine == "auto":
        t0 = time.perf_counter()
        result = affine_register(pair.fixed, pair.moving, similarity, device=device, names=(pair.fixed_name, pair.moving_name))
        summary = {**result.summary(), "seconds": time.perf_counter() - t0}
        return replace(pair, affine=result.transform(), affine_summary=summary)
    if isinstance(affine, sitk.Transform):
        if affine.GetDimension() != dim:
            raise DataError(f"{option}: a {affine.GetDimension()}D transform but the images are {dim}D")
        return replace(pair, affine=affine_transform(*affine_parts(affine)), affine_summary={"file": "(a SimpleITK transform)"})
    if not isinstance(affine, (str, Path)):
        raise UsageError(f"{option}: expected auto, none, a transform file or a SimpleITK transform, got {type(affine).__name__}")
    return replace(pair, affine=read_affine(affine, dim, option), affine_summary={"file": str(affine)})


def _check_labels_grid(labels: sitk.Image, moving: sitk.Image, name: str) -> None:
    """A label map on a grid other than its image's is warped in physical space (with a warning); one that
    does not overlap its image at all is refused."""
    g_labels, g_moving = Geometry.of(labels), Geometry.of(moving)
    if g_labels == g_moving:
        return
    corners = identity_grid((2,) * g_moving.dim, dtype=torch.float64)
    points = torch.cat([corners.flatten(2), torch.full((1, g_moving.dim, 1), 0.5, dtype=torch.float64)], 2)
    if not g_labels.inside(g_labels.from_physical(g_moving.to_physical(points))).any():
        raise DataError(f"{name} does not overlap the moving image in physical space (origin, spacing, direction)")
    print(f"cyclereg: warning: {name} is on a grid other than the moving image's; its labels are warped in physical space",
          file=sys.stderr)


def model_inputs(pair: Pair, prep: Preprocessing, size=None) -> tuple[Geometry, torch.Tensor, torch.Tensor]:
    """The fixed image's model grid and both images prepared on it, the moving image through the
    pair's affine transform: ``(grid, moving, fixed)``."""
    grid = model_grid(pair.fixed, prep, size)
    g_moving = pair.moving_geometry()
    inside = g_moving.inside(g_moving.from_physical(grid.to_physical(identity_grid(tuple(reversed(grid.size)), dtype=torch.float64))))
    if not inside.any():
        raise DataError(f"{pair.moving_name} and {pair.fixed_name} do not overlap in physical space "
                        "(origin, spacing, direction); align them affinely first")
    return (grid, prepare(pair.moving, grid, prep, pair.moving_name, pair.affine),
            prepare(pair.fixed, grid, prep, pair.fixed_name))


@dataclass
class Registration:
    """A pair, the model grid it was registered on, and the map ``Φ`` on that grid's domain (in the
    fixed image's frame: the whole map is ``T∘Φ`` for the pair's affine ``T``). ``reverse`` computes
    the model's map the other way on the same grid, ``Φ_BA ≈ Φ⁻¹``, when an inverse is asked for."""

    pair: Pair
    grid: Geometry
    phi: Transform
    reverse: Callable[[], Transform] | None = None


def device_for(model, device=None) -> torch.device:
    """Where a registration runs: the model's device, or without a network ``device`` (default: CUDA if
    there is a GPU)."""
    if model is not None:
        return next(model.parameters()).device
    return device if device is not None else default_device()


def register_pair(model, info, pair: Pair, tuning: InstanceOptimisation = NO_IO, device=None) -> Registration:
    """``pair`` registered by ``model`` (with ``info``), or with no network (``model`` None, on ``device``:
    :mod:`.networkfree`)."""
    if model is None:
        grid, m, f = model_inputs(pair, networkfree.preprocessing(pair.fixed))
        m, f = m.to(device), f.to(device)
        return Registration(pair, grid, networkfree.optimised_map(m, f, tuning),
                            reverse=lambda: networkfree.optimised_map(f, m, tuning))
    fixed_shape = any(s.network == "mlp" for s in info.config.model.steps)
    grid, m, f = model_inputs(pair, info.preprocess, tuple(reversed(info.shape)) if fixed_shape else None)
    return Registration(pair, grid, register_tensors(model, info, m, f, tuning),
                        reverse=lambda: register_tensors(model, info, f, m, tuning))


@torch.no_grad()
def map_physical(reg: Registration, points: torch.Tensor) -> torch.Tensor:
    """The registration's whole map on physical points ``(1, d, *S)`` (float64): fixed space -> moving space."""
    u = reg.grid.from_physical(points.double())
    return reg.pair.moving_geometry().physical(reg.grid.to_physical(reg.phi(u.float()).double()))


@torch.no_grad()
def inverse_physical(reg: Registration, points: torch.Tensor, reverse: Transform) -> torch.Tensor:
    """The inverse map ``Φ_BA∘T⁻¹`` on physical points of the moving image's space ``(1, d, *S)``:
    moving space -> fixed space (``reverse``: ``reg.reverse()``)."""
    aligned = reg.pair.reversed().moving_geometry().physical(points.double())
    return reg.grid.to_physical(reverse(reg.grid.from_physical(aligned).float()).double())


def sample_like_itk(image: torch.Tensor, points: torch.Tensor, geometry: Geometry, nearest: bool = False) -> torch.Tensor:
    """``image (1, 1, *shape)`` at domain ``points`` with ITK's resampling rules (0 outside)."""
    values = sample(image, points.to(image.dtype), mode="nearest" if nearest else "bilinear")
    return values.masked_fill_(~geometry.inside(points), 0.0)


def warp_image(image: sitk.Image, points: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """``image`` at its domain ``points (1, d, *S)`` with ITK's rules: a float32 tensor ``S`` (label values
    exact up to 2²⁴ when ``nearest``)."""
    values = image_to_tensor(image).to(points.device)
    return sample_like_itk(values, points.float(), Geometry.of(image), nearest)[0, 0]


def warp_labels(labels: sitk.Image, grid: OnFixedGrid) -> torch.Tensor:
    """A label map of the moving space (on the moving image's grid or its own) at the fixed image's
    voxels, nearest neighbour."""
    return warp_image(labels, grid.domain_of(Geometry.of(labels)), nearest=True)


def map_transform(reg: Registration, grid: OnFixedGrid) -> sitk.Transform:
    """The whole map as one ITK transform: the composite ``[T, D]`` (``T(D(x))``, ``D`` the model's
    displacement field, :func:`_field_part`) when the pair has an affine transform ``T``, else ``D``."""
    return one_transform(_map_parts(reg, grid))


def _map_parts(reg: Registration, grid: OnFixedGrid) -> list[sitk.Transform]:
    field = _field_part(reg, reg.phi, lambda: grid.aligned_displacement[0])
    return [field] if reg.pair.affine is None else [reg.pair.affine, field]


def _field_part(reg: Registration, phi: Transform, at_fixed_voxels: Callable[[], torch.Tensor]) -> sitk.Transform:
    """A model's map ``phi`` (fixed image's frame, before any affine stage) as an ITK displacement field.
    Where ``phi`` is a field on the model grid (field refinement, registration without a network), on
    that grid's nodes (:func:`~cyclereg.io.transforms.node_field_transform`): the same map exactly, in
    64³ nodes rather than a 256³ image's voxels (7 MB, not 400 MB, to build and write). Otherwise (a
    network's composed fields) the physical displacement ``at_fixed_voxels()`` on the fixed image's grid."""
    if isinstance(phi, DisplacementField):
        return node_field_transform(phi.field[0], reg.grid)
    return displacement_transform(at_fixed_voxels(), reg.pair.fixed)


def _voxel_points(image: sitk.Image, device=None) -> torch.Tensor:
    """The physical points ``(1, d, *shape)`` of every voxel of ``image`` (float64)."""
    g = Geometry.of(image)
    return g.to_physical(identity_grid(tuple(reversed(g.size)), device, torch.float64))


def inverse_transform(reg: Registration, device=None) -> sitk.Transform:
    """The inverse of the whole map, ``Φ_BA∘T⁻¹``, as one ITK transform (:func:`_inverse_parts`). The
    methods are inverse consistent, so the model's reverse map stands for ``Φ⁻¹``."""
    return one_transform(_inverse_parts(reg, device))


def _inverse_parts(reg: Registration, device=None) -> list[sitk.Transform]:
    """``[D_BA, T⁻¹]``, ``D_BA`` by :func:`_field_part` (``[D_BA]`` without an affine stage); a network's
    inverse without an affine stage is one field sampled on the moving image's grid, the points it maps."""
    reverse = reg.reverse()
    inverse_affine = reg.pair.reversed().affine
    if inverse_affine is None and not isinstance(reverse, DisplacementField):
        return [displacement_transform(inverse_displacement(reg, device, reverse), reg.pair.moving)]

    def at_fixed_voxels() -> torch.Tensor:
        x = _voxel_points(reg.pair.fixed, device)
        return (reg.grid.to_physical(reverse(reg.grid.from_physical(x).float()).double()) - x)[0]

    field = _field_part(reg, reverse, at_fixed_voxels)
    return [field] if inverse_affine is None else [field, inverse_affine]


def inverse_displacement(reg: Registration, device=None, reverse: Transform | None = None) -> torch.Tensor:
    """The inverse of the whole map as one displacement field ``(d, *moving shape)`` on the moving
    image's grid (moving point + displacement = fixed point); ``reverse``: ``reg.reverse()`` if computed."""
    x = _voxel_points(reg.pair.moving, device)
    return (inverse_physical(reg, x, reverse or reg.reverse()) - x)[0]


def write_outputs(reg: Registration, device=None, warped=None, transform=None, jacobian=None, warped_labels=None,
                  figure=None, transform_inverse=None) -> dict:
    """Write the requested outputs of a registration on the fixed image's grid (the inverse transform
    on the moving image's). Returns a summary."""
    grid = on_fixed_grid(reg, device)
    pair, det = reg.pair, grid.det
    summary = {"folds": int(folded(det).sum()), "folded_percent": folded_percent(det.cpu().numpy()),
               "jacobian_min": float(det.min()), "jacobian_max": float(det.max())}
    if pair.affine_summary is not None:
        summary["affine"] = pair.affine_summary
    with all_or_nothing():  # every output, or none (a full disk at the last one)
        _write_each(reg, grid, summary, device, warped, transform, jacobian, warped_labels, figure, transform_inverse)
    return summary


def _write_each(reg, grid, summary, device, warped, transform, jacobian, warped_labels, figure, transform_inverse) -> None:
    """The outputs of :func:`write_outputs`, one after the other."""
    pair, g_fixed, g_moving = reg.pair, Geometry.of(reg.pair.fixed), Geometry.of(reg.pair.moving)
    warped_image = warp_image(pair.moving, grid.moving_domain) if warped or figure else None
    warped_lab = None
    if pair.moving_labels is not None and (warped_labels or figure):
        warped_lab = warp_labels(pair.moving_labels, grid)
    if warped_labels:  # first: the one output that can still be refused (values its file cannot hold)
        if warped_lab is None:
            raise UsageError("--warped-labels needs --moving-labels")
        write_image(warped_labels, warped_lab, pair.fixed, pair.moving_labels.GetPixelID(), exact="--warped-labels")
    if warped:
        write_image(warped, warped_image, pair.fixed, pair.moving.GetPixelID())
    if figure:
        from cyclereg.io.slices import orthogonal_slices_figure

        before = warp_image(pair.moving, g_moving.from_physical(grid.fixed_physical.double()))
        fixed = image_to_tensor(pair.fixed)[0, 0]
        orthogonal_slices_figure(figure, fixed.numpy(), before.cpu().numpy(), warped_image.cpu().numpy(),
                                 points=g_fixed.from_physical(grid.aligned_physical.double())[0].cpu().numpy(),
                                 warped_labels=None if warped_lab is None else warped_lab.cpu().numpy(),
                                 spacing=tuple(reversed(g_fixed.spacing)),
                                 title=f"folds {summary['folds']}, det J in [{summary['jacobian_min']:.2f}, {summary['jacobian_max']:.2f}]")
    if jacobian:
        write_image(jacobian, grid.det_per_voxel(), pair.fixed, None)

    if transform:  # a transform file: the map's parts (one composite); an image: one field on the fixed grid
        if is_transform_file(transform):
            write_transform(transform, _map_parts(reg, grid))
        else:
            write_displacement(transform, grid.displacement[0], pair.fixed)
    if transform_inverse:
        if is_transform_file(transform_inverse):
            write_transform(transform_inverse, _inverse_parts(reg, device))
        else:
            write_displacement(transform_inverse, inverse_displacement(reg, device), pair.moving)


def register_files(model, info, fixed, moving, warped=None, transform=None, jacobian=None, moving_labels=None,
                   warped_labels=None, tuning: InstanceOptimisation = NO_IO, figure=None, transform_inverse=None,
                   affine="auto", affine_similarity: str = "ncc", device=None) -> dict:
    """Register the files ``moving`` to ``fixed`` with a trained model (None: without a network, on
    ``device``), after the affine stage (:func:`align`), and write the requested outputs in the fixed
    image's space. Returns a summary (folds, Jacobian range, the affine stage)."""
    if (moving_labels is None) != (warped_labels is None):
        raise UsageError("--moving-labels and --warped-labels go together")
    device = device_for(model, device)
    pair = align(read_pair(fixed, moving, moving_labels, dim=info.dim if info else None), affine, affine_similarity, device)
    reg = register_pair(model, info, pair, tuning, device)
    return write_outputs(reg, device, warped=warped, transform=transform, jacobian=jacobian,
                         warped_labels=warped_labels, figure=figure, transform_inverse=transform_inverse)


def warp_file(transform, moving, fixed, out, nearest: bool = False) -> None:
    """Apply a saved transform (``cyclereg register --transform``) to ``moving`` on ``fixed``'s grid,
    with SimpleITK's resampler (linear, or nearest for label maps; 0 outside), keeping the pixel type."""
    tx = read_transform(transform)
    moving_img, fixed_img = read_image(moving, "--moving"), read_image(fixed, "--fixed")
    for role, path, img in (("--moving", moving, moving_img), ("--fixed", fixed, fixed_img)):
        if img.GetDimension() != tx.GetDimension():
            raise DataError(f"{role} {path} is {img.GetDimension()}D but --transform {transform} is {tx.GetDimension()}D")
    result = sitk.Resample(moving_img, fixed_img, tx, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                           0.0, moving_img.GetPixelID())
    save_image(result, out)
