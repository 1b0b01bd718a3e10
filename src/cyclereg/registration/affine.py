"""Affine registration in PyTorch, 2D and 3D, in physical space (``cyclereg affine``).

The result is an ITK affine transform ``T(x) = A (x − c) + c + t`` taking fixed physical points to
moving physical points (ITK's convention, so ``sitk.Resample(moving, fixed, T)`` warps), with ``c`` the
fixed image's centre of mass.

* Each image is cut to the bounding box of its foreground (Otsu's threshold) and resampled, smoothed,
  onto axis-aligned grids of a few isotropic spacings (8, 4, 2 mm for a brain: ``extent / 24``,
  halved twice, by default): a 256³ field of view costs what its head costs.
* Initialisation: the centres of mass of the foregrounds, and the rotations that take the fixed image's principal axes
  onto the moving image's (every sign choice that keeps the handedness, and the identity), each given
  a short rigid run on the coarsest grid; the best of them is where the optimisation starts.
* Per grid, coarse to fine: translation, then rigid, then affine (Adam, cosine-decayed), on the fixed
  foreground. Similarity: global NCC (one contrast) or Mattes-style mutual information (cubic B-spline
  Parzen windows, differentiable; two contrasts).
* It never ends worse than it started: if the result scores worse on the finest grid than the identity
  or the start, the better of those two is returned instead, and the result says so.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from cyclereg.core.errors import DataError, UsageError
from cyclereg.core.optim import cosine_adam
from cyclereg.losses import ncc as global_ncc

__all__ = ["AffineResult", "affine_register", "to_itk", "SIMILARITIES"]

BINS = 32  # mutual information: histogram bins per image


@dataclass
class _Grid:
    """An image resampled onto an axis-aligned grid: values ``(1, 1, *shape)`` (tensor order) and the
    physical point of voxel 0 and the spacing, both in ITK order (x, y, z)."""

    values: torch.Tensor
    mask: torch.Tensor  # foreground, same shape
    origin: torch.Tensor
    spacing: float

    def __post_init__(self):
        """Keep at most ``POINTS`` foreground voxels (a seeded sample) to score maps with, and their
        physical points ``(M, d)`` (x, y, z)."""
        flat = torch.nonzero(self.mask.reshape(-1))[:, 0]
        if flat.numel() > POINTS:
            keep = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:POINTS]
            flat = flat[keep.to(flat.device)].sort().values
        self.chosen = flat
        index, rest = [], flat  # unravelled by hand: torch.unravel_index imports sympy (1.2 s)
        for n in reversed(self.values.shape[2:]):
            index.append(rest % n)
            rest = rest // n
        index = torch.stack(index, 1).to(self.origin.dtype)  # x, y, z
        self.points = self.origin + index * self.spacing

    def chosen_values(self) -> torch.Tensor:
        return self.values.reshape(-1)[self.chosen]

    def sample(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values at physical points ``(M, d)`` (linear) and whether each point falls inside the grid."""
        shape = torch.tensor(list(reversed(self.values.shape[2:])), dtype=points.dtype, device=points.device)
        index = (points - self.origin) / self.spacing
        normalised = 2 * index / (shape - 1).clamp(min=1) - 1
        grid = normalised.view(1, -1, *([1] * (points.shape[1] - 1)), points.shape[1])
        values = F.grid_sample(self.values, grid, mode="bilinear", padding_mode="border", align_corners=True)
        inside = ((index >= 0) & (index <= shape - 1)).all(1)
        return values.reshape(-1), inside


MASK_SPACING = 4.0  # mm: the foreground is found on a copy of about this spacing
POINTS = 20_000  # the fixed foreground points that score a map, at most (a seeded sample beyond)


def _foreground(image: sitk.Image) -> sitk.Image:
    """Otsu's foreground on a copy shrunk to about 4 mm, its largest part kept, holes closed. Otsu splits
    the distance of each voxel's value from the background's (the median of the image's faces), so that
    a background brighter than the object (some contrasts) is background too."""
    factors = [max(1, int(round(MASK_SPACING / s))) for s in image.GetSpacing()]
    small = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    values = sitk.GetArrayFromImage(small)
    faces = np.concatenate([np.moveaxis(values, k, 0)[[0, -1]].ravel() for k in range(values.ndim)])
    distance = sitk.GetImageFromArray(np.abs(values - np.median(faces)))
    distance.CopyInformation(small)
    mask = sitk.OtsuThreshold(distance, 0, 1)
    if not sitk.GetArrayViewFromImage(mask).any():
        return mask
    parts = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    return sitk.BinaryMorphologicalClosing(parts == 1, [1] * image.GetDimension())


def _corners(image: sitk.Image, start, size) -> np.ndarray:
    """Physical points of the corners of an index box ``start .. start + size - 1``."""
    d = image.GetDimension()
    return np.array([image.TransformContinuousIndexToPhysicalPoint([float(a + (n - 1) * c) for a, n, c in zip(start, size, corner)])
                     for corner in itertools.product((0, 1), repeat=d)])


def _box(mask: sitk.Image, name: str, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box ``(low, high)`` of the foreground, widened by ``margin`` mm."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if not stats.HasLabel(1):
        raise DataError(f"{name} has no foreground (the image is constant); nothing to align")
    d = mask.GetDimension()
    box = stats.GetBoundingBox(1)
    corners = _corners(mask, box[:d], box[d:])
    half = max(mask.GetSpacing())
    return corners.min(0) - margin - half, corners.max(0) + margin + half


def _crop(image: sitk.Image, low: np.ndarray, high: np.ndarray) -> sitk.Image:
    """The image cut to the index region that covers the physical box (any direction matrix)."""
    corners = [image.TransformPhysicalPointToContinuousIndex([float(v) for v in corner])
               for corner in itertools.product(*zip(low, high))]
    lo = np.clip(np.floor(np.min(corners, 0)).astype(int), 0, None)
    hi = np.minimum(np.ceil(np.max(corners, 0)).astype(int), np.array(image.GetSize()) - 1)
    if np.any(hi < lo):
        return image
    return sitk.RegionOfInterest(image, (hi - lo + 1).tolist(), lo.tolist())


def _resample(image: sitk.Image, low: np.ndarray, high: np.ndarray, spacing: float, nearest: bool = False) -> sitk.Image:
    """The image on the axis-aligned grid of ``spacing`` mm over the box, smoothed first to that spacing."""
    d = image.GetDimension()
    size = [int(math.ceil((h - lo) / spacing)) + 1 for lo, h in zip(low, high)]
    source = sitk.Cast(image, sitk.sitkFloat32)
    if not nearest:
        # Averages of blocks of about the new spacing first (cheap: a Gaussian on the 1 mm image costs 0.5 s),
        # then a Gaussian of variance (spacing² − s²) / 4 mm² per axis (none along axes as coarse already).
        factors = [max(1, int(spacing / s + 0.25)) for s in image.GetSpacing()]
        if max(factors) > 1:
            source = sitk.BinShrink(source, factors)
        variance = [max(0.0, 0.25 * (spacing ** 2 - s ** 2)) for s in source.GetSpacing()]
        if max(variance) > 0:
            source = sitk.DiscreteGaussian(source, variance, 32, 0.01, True)
    return sitk.Resample(source, size, sitk.Transform(), sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                         low.tolist(), [spacing] * d, np.eye(d).ravel().tolist(), 0.0, sitk.sitkFloat32)


def _pyramid(image: sitk.Image, spacings, device, name: str, mask_image: sitk.Image | None = None) -> list[_Grid]:
    """The image's foreground box on each grid (fine to coarse resampled from one another), returned
    coarse to fine. ``mask_image``: its :func:`_foreground`, if already found."""
    mask_image = _foreground(image) if mask_image is None else mask_image
    low, high = _box(mask_image, name, 2 * max(spacings))
    source, grids = _crop(image, low, high), []
    for s in sorted(spacings):
        source = _resample(source, low, high, s)
        values = torch.from_numpy(sitk.GetArrayFromImage(source)).to(device)[None, None]
        mask = torch.from_numpy(sitk.GetArrayFromImage(_resample(mask_image, low, high, s, nearest=True))).to(device)[None, None] > 0.5
        if not mask.any():
            raise DataError(f"{name}: its foreground vanishes on a {s:g} mm grid; the image is too small to align")
        fg = values[mask]
        lo, hi = torch.quantile(fg, 0.005), torch.quantile(fg, 0.995)  # robust [0, 1] scaling of the foreground
        values = ((values - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
        grids.append(_Grid(values, mask, torch.tensor(low, dtype=torch.float32, device=device), float(s)))
    return grids[::-1]


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 − NCC`` of two value vectors (:func:`cyclereg.losses.ncc`, 0 for an affine intensity relation)."""
    return global_ncc(a[None], b[None])[0]


def _bspline3(x: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline kernel (Mattes et al.'s Parzen window), support ``|x| < 2``."""
    x = x.abs()
    return torch.where(x < 1, 2 / 3 - x ** 2 + x ** 3 / 2, torch.where(x < 2, (2 - x) ** 3 / 6, torch.zeros_like(x)))


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int | None = None) -> torch.Tensor:
    """``−MI`` of two value vectors in ``[0, 1]``, from a joint histogram of cubic B-spline Parzen windows
    (differentiable in both); lower is better, as every similarity here. ``bins`` defaults to ``BINS``,
    fewer for few samples (about 4 per bin of each image's histogram, at least 8)."""
    bins = bins or int(min(BINS, max(8, round((a.numel() / 4) ** 0.5))))
    centres = torch.arange(bins, device=a.device, dtype=a.dtype)
    wa = _bspline3(a[:, None] * (bins - 3) + 1 - centres)  # values spread over bins 1..bins-2, the kernel fits
    wb = _bspline3(b[:, None] * (bins - 3) + 1 - centres)
    joint = wa.T @ wb / a.numel()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    ratio = joint / (pa * pb).clamp(min=1e-12)
    return -(joint * torch.log(ratio.clamp(min=1e-12))).sum()


SIMILARITIES = {"ncc": ncc, "mi": mutual_information}


def _rotation(omega: torch.Tensor, d: int) -> torch.Tensor:
    """The rotation ``exp(skew(ω))``: ``ω`` one angle in 2D, an axis-angle vector in 3D."""
    skew = torch.zeros(d, d, dtype=omega.dtype, device=omega.device)
    if d == 2:
        skew = skew + torch.stack([torch.stack([0 * omega[0], -omega[0]]), torch.stack([omega[0], 0 * omega[0]])])
    else:
        x, y, z = omega
        zero = 0 * x
        skew = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    return torch.linalg.matrix_exp(skew)


class _Params(torch.nn.Module):
    """``A = R0 · exp(skew(ω)) · (I + M)``, ``t``: ``R0`` an initial rotation, ``M`` the affine part."""

    def __init__(self, d: int, start: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.d = d
        self.register_buffer("start", start)
        self.omega = torch.nn.Parameter(torch.zeros(1 if d == 2 else 3, dtype=start.dtype, device=start.device))
        self.linear = torch.nn.Parameter(torch.zeros(d, d, dtype=start.dtype, device=start.device))
        self.shift = torch.nn.Parameter(shift.clone())

    def matrix(self) -> torch.Tensor:
        eye = torch.eye(self.d, dtype=self.start.dtype, device=self.start.device)
        return self.start @ _rotation(self.omega, self.d) @ (eye + self.linear)


def _cost(params: _Params, centre, fixed: _Grid, moving: _Grid, similarity):
    """The similarity of the fixed foreground and the moving image at the mapped points (those inside it);
    None when fewer than 16 points land inside."""
    points = fixed.points
    mapped = (points - centre) @ params.matrix().T + centre + params.shift
    values, inside = moving.sample(mapped)
    if int(inside.sum()) < 16:
        return None
    return similarity(fixed.chosen_values()[inside], values[inside])


def _optimise(params: _Params, centre, fixed: _Grid, moving: _Grid, similarity, stage: str, steps: int) -> None:
    """Adam (:func:`~cyclereg.core.optim.cosine_adam`) on the stage's parameters."""
    groups = [(params.shift, 0.5 * fixed.spacing)]
    if stage in ("rigid", "affine"):
        groups.append((params.omega, 0.02))
    if stage == "affine":
        groups.append((params.linear, 0.01))
    cosine_adam(groups, lambda: _cost(params, centre, fixed, moving, similarity), steps)


def _moments(grid: _Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass and principal axes (columns, by decreasing variance) of the foreground's shape, not of
    its intensities, which another contrast would weigh otherwise."""
    points = grid.points.double()
    centre = points.mean(0)
    offsets = points - centre
    cov = offsets.T @ offsets / len(points)
    _, vectors = torch.linalg.eigh(cov)
    return centre.float(), vectors.flip(-1).float()


def _candidates(fixed: _Grid, moving: _Grid) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The centres of mass and the initial rotations: the identity, and each rotation taking the fixed
    principal axes onto the moving ones (signs chosen so that the map keeps the handedness)."""
    c_f, v_f = _moments(fixed)
    c_m, v_m = _moments(moving)
    d = c_f.numel()
    rotations = [torch.eye(d)]
    for signs in itertools.product((1.0, -1.0), repeat=d):
        r = v_m @ torch.diag(torch.tensor(signs)) @ v_f.T
        if torch.det(r) > 0:
            rotations.append(r)
    return c_f, c_m, rotations


@dataclass
class AffineResult:
    """The affine map (``matrix``, ``centre``, ``translation``: ITK's parameters, x, y, z order), its
    similarity on the finest grid and that of where it started, and how it was chosen."""

    matrix: np.ndarray
    centre: np.ndarray
    translation: np.ndarray
    similarity: str
    cost: float
    cost_start: float
    cost_identity: float
    kept_start: bool  # the optimisation ended worse than it started: the start was kept

    def transform(self) -> sitk.AffineTransform:
        return to_itk(self.matrix, self.centre, self.translation)

    def summary(self) -> dict:
        return {"similarity": self.similarity, "cost": self.cost, "cost_start": self.cost_start,
                "cost_identity": self.cost_identity, "kept_start": self.kept_start}


def to_itk(matrix, centre, translation) -> sitk.AffineTransform:
    """``T(x) = A (x − c) + c + t`` as an ITK affine transform."""
    d = len(centre)
    out = sitk.AffineTransform(d)
    out.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    out.SetCenter(np.asarray(centre, float).tolist())
    out.SetTranslation(np.asarray(translation, float).tolist())
    return out


def default_spacings(fixed: sitk.Image, mask: sitk.Image | None = None) -> tuple[float, ...]:
    """Grid spacings, coarse to fine, scaled to the fixed image's foreground: its largest extent over 24,
    48 and 96 (8, 4 and 2 mm for a 190 mm head), never finer than the image's own spacing."""
    low, high = _box(_foreground(fixed) if mask is None else mask, "the fixed image", 0.0)
    extent, voxel = float(np.max(high - low)), min(fixed.GetSpacing())
    return tuple(dict.fromkeys(max(extent / k, voxel) for k in (24, 48, 96)))


STEPS = 30  # Adam steps per stage and grid: on the held-out brains (NCC) 20, 30 and 60 give the same Dice,
# 0.634; mutual information needs 30 on the synthetic tests


def affine_register(fixed: sitk.Image, moving: sitk.Image, similarity: str = "ncc", spacings=None, steps: int = STEPS,
                    device=None, names=("--fixed", "--moving")) -> AffineResult:
    """Align ``moving`` to ``fixed`` affinely as the module says. ``steps``: Adam steps per stage and grid.
    On a CPU it runs on one thread: its tensors are small (at most 20,000 points), and where another
    process keeps a core busy, two threads made it 10 times slower on this project's 2-core machine."""
    if torch.device(device or "cpu").type != "cpu":
        return _affine_register(fixed, moving, similarity, spacings, steps, device, names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _affine_register(fixed, moving, similarity, spacings, steps, device, names)
    finally:
        torch.set_num_threads(threads)


def _affine_register(fixed, moving, similarity, spacings, steps, device, names) -> AffineResult:
    if similarity not in SIMILARITIES:
        raise UsageError(f"--similarity: expected one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if fixed.GetDimension() != moving.GetDimension():
        raise DataError(f"{names[1]} is {moving.GetDimension()}D but {names[0]} is {fixed.GetDimension()}D")
    cost_fn = SIMILARITIES[similarity]
    fixed_mask = _foreground(fixed)
    spacings = tuple(spacings or default_spacings(fixed, fixed_mask))
    f_grids = _pyramid(fixed, spacings, device, names[0], fixed_mask)
    m_grids = _pyramid(moving, spacings, device, names[1])
    d = fixed.GetDimension()
    c_f, c_m, rotations = _candidates(f_grids[0], m_grids[0])
    starts = []
    for rotation in rotations:
        candidate = _Params(d, rotation.to(c_f), c_m - c_f)
        if _cost(candidate, c_f, f_grids[0], m_grids[0], cost_fn) is None:
            continue
        _optimise(candidate, c_f, f_grids[0], m_grids[0], cost_fn, "rigid", steps // 2)
        with torch.no_grad():
            starts.append((float(_cost(candidate, c_f, f_grids[0], m_grids[0], cost_fn)), len(starts), candidate))
    if not starts:
        raise DataError(f"{names[1]} and {names[0]} do not overlap once their centres of mass are aligned; "
                        "check their headers (origin, spacing, direction)")
    params = min(starts)[2]
    start = copy.deepcopy(params)
    finest_f, finest_m = f_grids[-1], m_grids[-1]
    with torch.no_grad():
        cost_start = _cost(start, c_f, finest_f, finest_m, cost_fn)
        cost_start = math.inf if cost_start is None else float(cost_start)
        identity = _Params(d, torch.eye(d).to(c_f), torch.zeros_like(c_f))
        cost_identity = _cost(identity, c_f, finest_f, finest_m, cost_fn)
        cost_identity = math.inf if cost_identity is None else float(cost_identity)
    for level, (f_grid, m_grid) in enumerate(zip(f_grids, m_grids)):
        for stage in ("translation", "rigid", "affine") if level == 0 else ("affine",):
            _optimise(params, c_f, f_grid, m_grid, cost_fn, stage, steps)
    with torch.no_grad():
        cost = _cost(params, c_f, finest_f, finest_m, cost_fn)
        cost = math.inf if cost is None else float(cost)
        kept_start = cost > min(cost_start, cost_identity)
        if kept_start:  # never worse than where it started
            params = identity if cost_identity < cost_start else start
            cost = min(cost_start, cost_identity)
        matrix = params.matrix().double().cpu().numpy()
        translation = params.shift.double().cpu().numpy()
    return AffineResult(matrix, c_f.double().cpu().numpy(), translation, similarity, cost, cost_start, cost_identity,
                        kept_start)
