"""A figure of one registered pair: the three orthogonal mid slices of a 3D volume (or the single
slice of a 2D image) of the fixed, moving and warped moving images, their difference, the map as
a deformed grid and label maps as overlays.

Arrays are numpy arrays in tensor axis order without batch or channel dimensions, as in
:mod:`cyclereg.core.coords`; ``spacing`` is in that order too.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from cyclereg.core.atomic import atomic_path  # noqa: E402
from cyclereg.core.coords import check_spacing  # noqa: E402
from cyclereg.io.figures import draw_grid  # noqa: E402

__all__ = ["orthogonal_slices_figure"]

_PLANES = ("axial", "coronal", "sagittal")  # slices through tensor axis 0 (z), 1 (y), 2 (x)
_LABEL_COLOURS = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]  # 10 hues, then their light tints


def _check(name: str, array, shape, lead=()) -> np.ndarray | None:
    if array is None:
        return None
    array = np.asarray(array)
    if array.shape != (*lead, *shape):
        expected = "(" + ", ".join(str(n) for n in (*lead, *shape)) + ")"
        raise ValueError(f"orthogonal_slices_figure: {name} has shape {array.shape}, expected {expected} (the fixed grid)")
    return array


def _slice(array: np.ndarray, axis: int | None) -> np.ndarray:
    """The mid slice through tensor ``axis`` of a 3D array (the array itself for ``axis=None``)."""
    return array if axis is None else np.take(array, array.shape[axis] // 2, axis=axis)


def _overlay(ax, labels: np.ndarray) -> None:
    """Labels as a semi-transparent overlay; label 0 is transparent and a label keeps its colour in every panel."""
    labels = np.rint(labels).astype(np.int64)
    index = np.ma.masked_where(labels <= 0, (labels - 1) % len(_LABEL_COLOURS))
    ax.imshow(index, cmap=ListedColormap(_LABEL_COLOURS), vmin=-0.5, vmax=len(_LABEL_COLOURS) - 0.5, alpha=0.4,
              interpolation="nearest")


def orthogonal_slices_figure(path, fixed, moving, warped, points=None, fixed_labels=None, warped_labels=None,
                             title: str | None = None, spacing=None, moving_spacing=None) -> None:
    """Write a PNG of a registered pair, atomically.

    Rows: the axial, coronal and sagittal mid slices (through tensor axes 0, 1, 2) of a 3D volume,
    or the one slice of a 2D image; in each panel, rows of pixels follow the first remaining tensor
    axis, top to bottom. Columns: fixed, moving, warped moving, ``|warped - fixed|`` and, when
    ``points`` is given, the warped slice with the map drawn as a deformed grid
    (:func:`cyclereg.io.figures.draw_grid`: contours of the two in-plane components of the map on the
    slice). ``fixed_labels`` and ``warped_labels`` are drawn as coloured overlays on the fixed and
    warped panels.

    Shapes: ``fixed``, ``warped``, the label maps ``(D, H, W)`` or ``(H, W)``; ``points (d, *shape)``,
    the map evaluated on the fixed grid in domain coordinates (component ``k`` along tensor axis
    ``k``); ``moving`` any shape of the same dimension. ``spacing`` (fixed grid) and
    ``moving_spacing`` (defaults to ``spacing``) set each panel's aspect ratio. Raises
    ``ValueError`` naming the argument when a shape or spacing does not fit; nothing is written then.
    """
    fixed, moving = np.asarray(fixed, dtype=np.float64), np.asarray(moving, dtype=np.float64)
    ndim = fixed.ndim
    if ndim not in (2, 3):
        raise ValueError(f"orthogonal_slices_figure: fixed must be a 2D or 3D array, got shape {fixed.shape}")
    if moving.ndim != ndim:
        raise ValueError(f"orthogonal_slices_figure: moving has shape {moving.shape}, expected a {ndim}D array like fixed")
    shape = fixed.shape
    warped = _check("warped", warped, shape).astype(np.float64)
    points = _check("points", points, shape, lead=(ndim,))
    fixed_labels = _check("fixed_labels", fixed_labels, shape)
    warped_labels = _check("warped_labels", warped_labels, shape)
    spacing = check_spacing(spacing, ndim, "orthogonal_slices_figure: spacing")
    moving_spacing = spacing if moving_spacing is None else check_spacing(moving_spacing, ndim, "orthogonal_slices_figure: moving_spacing")

    axes_through = list(range(3)) if ndim == 3 else [None]
    columns = ["fixed", "moving", "warped moving", "|warped - fixed|"] + (["map"] if points is not None else [])
    lo, hi = float(min(fixed.min(), moving.min())), float(max(fixed.max(), moving.max()))
    diff = np.abs(warped - fixed)
    diff_max = float(diff.max()) or 1.0

    fig, axes = plt.subplots(len(axes_through), len(columns), figsize=(2.3 * len(columns), 2.4 * len(axes_through)),
                             squeeze=False)
    try:
        for row, through in enumerate(axes_through):
            in_plane = [k for k in range(ndim) if k != through]
            aspect = spacing[in_plane[0]] / spacing[in_plane[1]]
            moving_aspect = moving_spacing[in_plane[0]] / moving_spacing[in_plane[1]]
            fixed_slice, warped_slice = _slice(fixed, through), _slice(warped, through)
            panels = [(fixed_slice, fixed_labels), (_slice(moving, through), None), (warped_slice, warped_labels),
                      (_slice(diff, through), None)] + ([(warped_slice, None)] if points is not None else [])
            for col, (image, labels) in enumerate(panels):
                ax = axes[row, col]
                if col == 3:
                    ax.imshow(image, cmap="magma", vmin=0.0, vmax=diff_max, interpolation="nearest")
                else:
                    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                if labels is not None:
                    _overlay(ax, _slice(labels, through))
                if col == 4 and min(image.shape) > 1:
                    draw_grid(ax, _slice(points[in_plane], None if through is None else through + 1))
                h, w = image.shape
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
                ax.set_aspect(moving_aspect if col == 1 else aspect)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(columns[col], fontsize=9)
            if through is not None:
                axes[row, 0].set_ylabel(f"{_PLANES[through]} ({shape[through] // 2})", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
