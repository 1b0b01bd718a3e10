"""Reading and writing images with SimpleITK, and the link between cyclereg's domain coordinates
and an image's physical space.

Tensor axes are the reverse of ITK's index axes: an ITK image of size ``(x, y[, z])`` becomes a tensor
``(1, 1, [z,] y, x)`` (:mod:`cyclereg.core.coords`). Physical points are ITK's (LPS, ``x, y, z`` order).
A domain coordinate ``u`` (tensor order, ``[0, 1]``) of an image is the physical point
``origin + direction @ diag(spacing) @ reversed(u * (size - 1))``.
"""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from cyclereg.core.atomic import atomic_path, incomplete_write
from cyclereg.io.dicom import read_dicom_series
from cyclereg.io.itk import itk_messages
from cyclereg.core.errors import DataError, UsageError

__all__ = ["read_image", "image_to_tensor", "Geometry", "Reframed", "to_image", "write_image"]

# Orientation is handled once, by SimpleITK: NIfTI headers hold RAS coordinates and SimpleITK turns
# them into ITK's LPS when reading (and back when writing); everything in cyclereg is LPS.


def read_image(path, role: str = "image") -> sitk.Image:
    """Read a scalar 2D or 3D image with SimpleITK; errors name ``role`` (``--fixed``...) and the file.

    The header is checked before any voxel is read (dimension, size, memory), a gzip stream must be
    complete, and every voxel must be finite."""
    path = Path(path)
    name = f"{role} {path}"
    if not path.exists():
        raise DataError(f"{name} does not exist")
    if path.is_dir():
        image = read_dicom_series(path, role)
        _check_header(name, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
        _check_finite(sitk.GetArrayViewFromImage(image), name)
        return image
    if path.stat().st_size == 0:
        raise DataError(f"{name} is an empty file")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_frames(path, name)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with itk_messages(name, "cannot be read as an image"):
            reader.ReadImageInformation()
    except DataError:
        _name_against_content(path, name)  # a known format under another name: say so
        raise
    _check_header(name, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    nifti_float = (path.name.lower().endswith((".nii", ".nii.gz"))
                   and reader.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64))
    raw = _gunzip(path, name, keep=nifti_float) if path.suffix.lower() == ".gz" else None
    if nifti_float:
        _check_nifti_finite(path, name, raw)
    with itk_messages(name, "cannot be read as an image"):
        image = reader.Execute()
    if not nifti_float:  # NIfTI floats were checked above, before ITK's reader replaced NaN and Inf by 0
        _check_finite(sitk.GetArrayViewFromImage(image), name)
    return image


def _check_finite(values: np.ndarray, name: str) -> None:
    if values.dtype.kind == "f":
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise DataError(f"{name} holds {bad} NaN or infinite voxel(s); expected finite values")


def _check_header(name: str, dim: int, size, components: int) -> None:
    if components != 1:
        raise DataError(f"{name} has {components} components per pixel; expected a scalar image")
    if dim not in (2, 3):
        raise DataError(f"{name} is {dim}D; expected a 2D or 3D image")
    if min(size) < 2:
        raise DataError(f"{name} has size {tuple(size)}; every axis needs at least 2 voxels")
    needed = 4 * float(np.prod(size, dtype=np.float64))  # as float32
    if needed > _memory_bytes():
        raise DataError(f"{name} claims a size of {' x '.join(map(str, size))} voxels ({needed / 1e9:.3g} GB as float32), "
                        f"more than this machine's memory ({_memory_bytes() / 1e9:.3g} GB)")


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return float("inf")


def _gunzip(path: Path, name: str, keep: bool) -> bytes | None:
    """Decompress a gzip file to its end, which must be there: SimpleITK reads a truncated one
    without complaint. Returns the content if ``keep``, else reads it in chunks and returns None."""
    try:
        with gzip.open(path, "rb") as f:
            if keep:
                return f.read()
            while f.read(1 << 24):
                pass
            return None
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{name} is a damaged or truncated gzip file ({err})") from None


# (format, the file name endings ITK reads it by, test on the first bytes of the content)
_SIGNATURES = (("NIfTI", (".nii", ".nii.gz"), lambda b: b[344:348] in (b"n+1\0", b"ni1\0") or b[4:8] == b"n+2\0"),
               ("PNG", (".png",), lambda b: b.startswith(b"\x89PNG")),
               ("MetaImage", (".mha", ".mhd"), lambda b: b.lstrip().startswith((b"ObjectType", b"NDims"))),
               ("NRRD", (".nrrd", ".nhdr"), lambda b: b.startswith(b"NRRD")),
               ("DICOM", (".dcm",), lambda b: b[128:132] == b"DICM"))


def _name_against_content(path: Path, name: str) -> None:
    """Raise a clear error if the file holds a format that its name does not say (ITK picks its reader
    by the name): a NIfTI file named ``.mha``, say."""
    try:
        with open(path, "rb") as f:
            head = f.read(560)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(560)
    except (OSError, EOFError, zlib.error):
        return
    lowered = path.name.lower()
    for kind, endings, matches in _SIGNATURES:
        if matches(head) and not lowered.endswith(endings):
            raise DataError(f"{name} holds a {kind} image but its name says otherwise; ITK chooses its reader by "
                            f"the name: rename it to end in {' or '.join(endings)}")


def _orthonormal(affine: np.ndarray) -> bool:
    m = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if not (norms > 0).all():
        return False
    axes = m / norms
    return bool(np.allclose(axes.T @ axes, np.eye(3), atol=1e-4))


def _check_nifti_frames(path: Path, name: str) -> None:
    """A NIfTI header's two frames, as ITK reads them: the sform when its code is set and its axes are
    orthonormal, else the qform. Warn when the sform and qform disagree (the sform is used, as ITK and
    nibabel do) or when a sheared sform gives way to the qform; refuse a header with no orthonormal frame."""
    import nibabel

    try:
        header = nibabel.load(str(path)).header
        sform, s_code = header.get_sform(coded=True)
        qform, q_code = header.get_qform(coded=True)
    except Exception:  # noqa: BLE001 - not readable by nibabel: ITK's reader says what is wrong
        return
    if s_code and not _orthonormal(sform):
        if q_code:
            print(f"cyclereg: warning: {name}: its sform has shear or axes that are not orthonormal; the qform is "
                  "used, as ITK does", file=sys.stderr)
            return
        raise DataError(f"{name} has a direction matrix with shear or axes that are not orthonormal (its sform; "
                        "no qform); cyclereg, like ITK, needs orthonormal axes: resample the image onto a regular grid")
    if s_code and q_code:
        corners = _CORNERS * (np.array((list(header.get_data_shape()) + [1, 1, 1])[:3], float) - 1)
        gap = float(np.abs(nibabel.affines.apply_affine(sform, corners) - nibabel.affines.apply_affine(qform, corners)).max())
        if gap > 0.01:
            print(f"cyclereg: warning: {name}: its sform and qform disagree (by up to {gap:.3g} mm at its corners); "
                  "the sform is used, as ITK and nibabel do", file=sys.stderr)


_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)


def _check_nifti_finite(path: Path, name: str, raw: bytes | None = None) -> None:
    """ITK's NIfTI reader (before ITK 6) turns NaN and infinite voxels into 0 without a word, so
    NIfTI files with float voxels are checked with nibabel, which reads the stored values (from
    ``raw``, the file already decompressed, when given: NIfTI-1, the common kind)."""
    import nibabel

    try:
        try:
            image = nibabel.Nifti1Image.from_bytes(raw) if raw is not None else nibabel.load(str(path))
        except nibabel.spatialimages.HeaderDataError:  # not NIfTI-1 (NIfTI-2): let nibabel read the file
            image = nibabel.load(str(path))
        values = np.asanyarray(image.dataobj)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise DataError(f"{name} cannot be read as a NIfTI image ({err})") from None
    _check_finite(values, name)


def image_to_tensor(image: sitk.Image) -> torch.Tensor:
    """``(1, 1, *spatial)`` float32 tensor of a scalar image (finite: :func:`read_image` checked it)."""
    return torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]


@dataclass(frozen=True)
class Geometry:
    """Size, spacing, origin and direction of an image, in ITK's axis order."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @property
    def dim(self) -> int:
        return len(self.size)

    def matrix(self) -> np.ndarray:
        """``direction @ diag(spacing)``: ITK index offsets to physical offsets."""
        return np.asarray(self.direction, float).reshape(self.dim, self.dim) @ np.diag(self.spacing)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, o)`` with physical point ``= A @ u + o`` for a domain point ``u`` (tensor order):
        ``A = direction @ diag(spacing) @ diag(size - 1) @ R``, ``R`` reversing the component order."""
        reverse = np.eye(self.dim)[::-1]  # tensor order -> ITK order
        return self.matrix() @ np.diag([n - 1.0 for n in self.size]) @ reverse, np.asarray(self.origin, float)

    def to_physical(self, points: torch.Tensor) -> torch.Tensor:
        """Domain points ``(N, d, *S)`` (tensor order, ``[0, 1]``) -> physical ``(N, d, *S)`` (x, y, z)."""
        return self.points_to(points, None)

    def from_physical(self, points: torch.Tensor) -> torch.Tensor:
        """Physical points ``(N, d, *S)`` (x, y, z) -> domain points (tensor order, ``[0, 1]``)."""
        a, o = self.affine()
        inverse = np.linalg.inv(a)
        return _apply_affine(inverse, -inverse @ o, points)

    def affine_to(self, other: "Geometry | None") -> tuple[np.ndarray, np.ndarray]:
        """``(A, o)`` (float64) taking this image's domain points ``u`` to ``A @ u + o``, domain points of
        ``other`` (or physical points when ``other`` is None)."""
        a, o = self.affine()
        if other is None:
            return a, o
        b, q = other.affine()
        b_inv = np.linalg.inv(b)
        return b_inv @ a, b_inv @ (o - q)

    def points_to(self, points: torch.Tensor, other: "Geometry | None") -> torch.Tensor:
        """Domain points of this image ``(N, d, *S)`` as domain points of ``other`` (or physical
        points when ``other`` is None), as one affine map composed in float64 and applied in the
        points' own precision (float32 is exact to about 1e-5 mm over a 200 mm scan)."""
        return _apply_affine(*self.affine_to(other), points)

    def inside(self, points: torch.Tensor) -> torch.Tensor:
        """Where domain points fall inside the image as ITK's interpolators see it: continuous index
        in ``[-0.5, n - 0.5)`` along every axis. Returns a boolean ``(N, 1, *S)``."""
        out = torch.ones_like(points[:, :1], dtype=torch.bool)
        for k, n in enumerate(reversed(self.size)):  # the bounds in domain units: one comparison per axis
            if n > 1:  # one voxel along an axis: every index rounds to it
                p = points[:, k:k + 1]
                out &= (p >= -0.5 / (n - 1)) & (p < (n - 0.5) / (n - 1))
        return out

    def extent_volume(self) -> float:
        """Signed volume spanned by the voxel centres (direction handedness included)."""
        return float(np.linalg.det(self.matrix() * np.array([n - 1 for n in self.size])[None, :]))

    def physical(self, points: torch.Tensor) -> torch.Tensor:
        """Points of the frame the image is seen from as its own physical points: for an image seen
        from its own frame, the points themselves (see :class:`Reframed`)."""
        return points

    def seen_through(self, linear: np.ndarray, offset: np.ndarray) -> "Reframed":
        """This image seen from another physical frame, whose point ``q`` is this image's physical point
        ``linear @ q + offset`` (an affine transform from a fixed image's space to this, a moving, image's)."""
        return Reframed(self.size, self.spacing, self.origin, self.direction,
                        tuple(np.asarray(linear, float).ravel()), tuple(np.asarray(offset, float)))


@dataclass(frozen=True)
class Reframed(Geometry):
    """An image's geometry seen from another frame (:meth:`Geometry.seen_through`): its domain points
    map to the frame's points, ``physical`` takes the frame's points to the image's own space."""

    linear: tuple
    offset: tuple

    def _frame(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.linear).reshape(self.dim, self.dim), np.asarray(self.offset)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        a, o = super().affine()
        linear, offset = self._frame()
        inverse = np.linalg.inv(linear)
        return inverse @ a, inverse @ (o - offset)

    def physical(self, points: torch.Tensor) -> torch.Tensor:
        """The frame's points ``(N, d, *S)`` as physical points of the image itself."""
        linear, offset = self._frame()
        return _apply_affine(linear, offset, points)


def _apply_affine(matrix: np.ndarray, offset: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """``matrix @ p + offset`` for points ``(N, d, *S)``, in the points' dtype and device."""
    m = torch.tensor(matrix, dtype=points.dtype, device=points.device)
    o = torch.tensor(offset, dtype=points.dtype, device=points.device).view(-1, 1)
    # One matrix product per item (addmm): several times faster than einsum's general path in float64.
    flat = points.reshape(points.shape[0], points.shape[1], -1)
    return torch.stack([torch.addmm(o, m, item) for item in flat]).view(points.shape)


def to_image(array, reference: sitk.Image, pixel_id=None) -> sitk.Image:
    """``array`` (tensor order) as a SimpleITK image with ``reference``'s geometry; ``pixel_id`` (a
    SimpleITK pixel type) casts it, with rounding and clipping for integer types."""
    data = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    if pixel_id is not None and pixel_id not in (sitk.sitkFloat32, sitk.sitkFloat64):
        info = np.iinfo(sitk.GetArrayViewFromImage(sitk.Image([1] * reference.GetDimension(), pixel_id)).dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    image = sitk.GetImageFromArray(data.astype(np.float32))
    image.CopyInformation(reference)
    return sitk.Cast(image, pixel_id) if pixel_id is not None else image


def write_image(path, array, reference: sitk.Image, pixel_id=None, exact: str | None = None) -> None:
    """Write ``array`` (tensor order) with ``reference``'s geometry, atomically (:func:`to_image`);
    formats that hold only 8-bit data (PNG, JPEG, BMP) get ``sitkUInt8``. ``exact`` (an option's name):
    values that the file's type cannot hold (labels) are refused instead of clipped."""
    if "".join(Path(path).suffixes).lower().endswith((".png", ".jpg", ".jpeg", ".bmp")):
        pixel_id = sitk.sitkUInt8
    if exact and pixel_id is not None and pixel_id not in (sitk.sitkFloat32, sitk.sitkFloat64):
        info = np.iinfo(sitk.GetArrayViewFromImage(sitk.Image([1] * reference.GetDimension(), pixel_id)).dtype)
        values = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise UsageError(f"{exact} {path}: the values go from {values.min():g} to {values.max():g}, but the file holds "
                             f"{info.dtype} ({info.min} to {info.max}); name a .nii.gz or .mha file")
    save_image(to_image(array, reference, pixel_id), path)


def save_image(image: sitk.Image, path) -> None:
    """``sitk.WriteImage`` atomically; a write that fails or stops short (a full disk, ``ulimit -f``) is one
    error naming the file, and leaves nothing. ITK's NIfTI writer reports a short write only on stderr,
    so a NIfTI file is checked complete before it replaces ``path``."""
    needed = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent() * image.GetNumberOfComponentsPerPixel()
    with atomic_path(path) as tmp:  # a writer's failure for want of room: atomic_path says it once
        with itk_messages(f"output {path}", "could not be written"):  # what ITK printed: dropped if incomplete
            sitk.WriteImage(image, str(tmp))
            if not _nifti_complete(tmp):
                raise DataError(incomplete_write(path, needed))


def _nifti_complete(path: Path) -> bool:
    """False for a NIfTI-1 file shorter than its header says (gzip: the stream's length in its trailer);
    True for a complete one and for other formats."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return True
    try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            header = f.read(348)
        endian = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
        dims = np.frombuffer(header[40:56], dtype=f"{endian}i2")
        bitpix = int(np.frombuffer(header[72:74], dtype=f"{endian}i2")[0])
        offset = int(np.frombuffer(header[108:112], dtype=f"{endian}f4")[0])
    except (OSError, EOFError, IndexError, ValueError):
        return False
    expected = offset + int(np.prod(dims[1:1 + int(dims[0])], dtype=np.int64)) * bitpix // 8
    if not name.endswith(".gz"):
        return path.stat().st_size >= expected
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return False
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") == expected % 2**32
