"""Transform files: ITK transforms in physical space (``.h5``, ``.tfm``, ``.txt``, ``.mat``) and displacement
fields stored as vector images (``.nii.gz``, ``.mha``, ...), in ITK's convention: a transform takes points
of the fixed image's space to points of the moving image's space (fixed point + displacement = moving
point), so ``sitk.Resample(moving, fixed, transform)`` warps. An ITK composite transform ``[T, D]``
applies ``D`` first: ``T(D(x))``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from cyclereg.core.atomic import atomic_path, check_output, incomplete_write, room_for
from cyclereg.core.errors import DataError
from cyclereg.io.images import Geometry, save_image
from cyclereg.io.itk import itk_messages

__all__ = ["is_transform_file", "read_transform", "read_affine", "affine_parts", "affine_transform", "one_transform",
           "write_transform", "write_displacement", "displacement_transform", "node_field_transform"]

TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


def is_transform_file(path) -> bool:
    """Whether ``path`` names an ITK transform file (rather than a displacement field image)."""
    return "".join(Path(path).suffixes).lower().endswith(TRANSFORM_SUFFIXES)


def read_transform(path, option: str = "--transform") -> sitk.Transform:
    """A transform file written by :func:`write_transform` (or any ITK transform file), or a
    displacement field stored as a vector image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{option} {path} does not exist" if not path.exists() else f"{option} {path} is not a file")
    with itk_messages(f"{option} {path}", "cannot be read as a transform"):
        if is_transform_file(path):
            return sitk.ReadTransform(str(path))
        field = sitk.ReadImage(str(path))
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
        raise DataError(f"{option} {path} is not a displacement field (expected {field.GetDimension()} components per voxel)")
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def affine_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(L, b)`` with ``transform(x) = L @ x + b``, read off the transform at the origin and the unit
    points (any ITK transform that is affine: matrix, Euler, similarity, composites of them)."""
    d = transform.GetDimension()
    offset = np.asarray(transform.TransformPoint((0.0,) * d))
    linear = np.stack([np.asarray(transform.TransformPoint(tuple(np.eye(d)[k]))) - offset for k in range(d)], axis=1)
    return linear, offset


def affine_transform(linear: np.ndarray, offset: np.ndarray) -> sitk.AffineTransform:
    """``x -> linear @ x + offset`` as an ITK affine transform."""
    out = sitk.AffineTransform(len(offset))
    out.SetMatrix(np.asarray(linear, float).ravel().tolist())
    out.SetTranslation(np.asarray(offset, float).tolist())
    return out


def read_affine(path, dim: int, option: str = "--affine") -> sitk.AffineTransform:
    """An affine transform file (ITK, ANTs ``.mat``, or FreeSurfer's converted to ITK) for ``dim``-D
    images, checked: of that dimension, affine (not a displacement field), invertible."""
    transform = read_transform(path, option)
    if transform.GetDimension() != dim:
        raise DataError(f"{option} {path} is a {transform.GetDimension()}D transform but the images are {dim}D")
    linear, offset = affine_parts(transform)
    rng = np.random.default_rng(0)
    for point in rng.uniform(-200.0, 200.0, size=(8, dim)):  # an affine map is affine everywhere
        if np.abs(np.asarray(transform.TransformPoint(tuple(point))) - (linear @ point + offset)).max() > 1e-4:
            raise DataError(f"{option} {path} is not an affine transform ({transform.GetName()}); "
                            "expected a matrix (affine, rigid, similarity) transform")
    if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-8:
        raise DataError(f"{option} {path} is not invertible (determinant {np.linalg.det(linear):.3g})")
    return affine_transform(linear, offset)


def _parameter_bytes(transform: sitk.Transform) -> int:
    """The bytes of a transform's parameters as doubles."""
    return 8 * (transform.GetNumberOfParameters() + transform.GetNumberOfFixedParameters())


def one_transform(parts: list) -> sitk.Transform:
    """ITK transforms as one: their composite (ITK's order: the last is applied to points first), or the
    one transform itself."""
    return parts[0] if len(parts) == 1 else sitk.CompositeTransform(list(parts))


def write_transform(path, transform) -> None:
    """Write an ITK transform file atomically; a failed write is one error naming the file. ``transform``
    is a SimpleITK transform or a list of them (written as :func:`one_transform`). The room is checked
    first: ITK's HDF5 writer, cut short, takes the process down as it exits. (Counted on the list's
    parts: reading a composite's parts back copies each.)"""
    if isinstance(transform, (list, tuple)):
        parts, transform = list(transform), one_transform(transform)
    elif transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        parts = [composite.GetNthTransform(k) for k in range(composite.GetNumberOfTransforms())]
    else:
        parts = [transform]
    needed = sum(_parameter_bytes(t) for t in parts)
    check_output(path)
    if needed > room_for(path):
        raise DataError(incomplete_write(path, needed))
    with atomic_path(path) as tmp:
        with itk_messages(f"output {path}", "could not be written"):
            sitk.WriteTransform(transform, str(tmp))


def write_displacement(path, displacement: torch.Tensor, reference: sitk.Image) -> None:
    """Write a physical displacement field ``(d, *spatial)`` (components x, y, z) on ``reference``'s
    grid, as an ITK displacement-field transform (``.h5``, ``.tfm``, ...) or a vector image
    (``.nii.gz``, ``.mha``, ``.nrrd``).

    A transform file holds doubles (ITK's displacement-field transform needs them); a vector image
    holds floats, as ANTs writes its warps: half the bytes, and 1.8 s less to gzip a 1 mm brain's
    field on this project's CPU, while float32 resolves a displacement to 1e-5 mm."""
    if is_transform_file(path):
        write_transform(path, displacement_transform(displacement, reference))
        return
    field = sitk.GetImageFromArray(displacement.detach().cpu().float().movedim(0, -1).numpy(), isVector=True)
    field.CopyInformation(reference)
    save_image(field, path)


def displacement_transform(displacement: torch.Tensor, reference: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A physical displacement field ``(d, *spatial)`` on ``reference``'s grid as an ITK
    displacement-field transform (doubles, as ITK needs)."""
    array = displacement.detach().cpu().to(torch.float64).movedim(0, -1).numpy()
    field = sitk.GetImageFromArray(array, isVector=True)
    field.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(field)


def node_field_transform(field: torch.Tensor, grid: Geometry) -> sitk.DisplacementFieldTransform:
    """A map's displacement field on the nodes of ``grid``, ``(d, *grid shape)`` in the grid's domain units
    (tensor order, :mod:`cyclereg.core.coords`), as an ITK displacement-field transform on that grid
    (physical displacements, doubles). ITK interpolates it linearly between the nodes, as the map itself
    does, so the file holds the map exactly at every point, in the field's own few nodes. One node of the
    border values is added on every side: the map holds its border value beyond its outermost nodes
    (border padding), and ITK gives no displacement outside a field's nodes; the extra nodes carry the
    border value over the edge voxels of the image the grid was built on."""
    linear = torch.tensor(grid.affine()[0], dtype=torch.float64)
    physical = torch.einsum("ij,j...->i...", linear, field.detach().cpu().double())
    padded = F.pad(physical[None], [1, 1] * grid.dim, mode="replicate")[0]
    image = sitk.GetImageFromArray(padded.movedim(0, -1).numpy(), isVector=True)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    image.SetOrigin(tuple(np.asarray(grid.origin, float) - grid.matrix() @ np.ones(grid.dim)))
    return sitk.DisplacementFieldTransform(image)
