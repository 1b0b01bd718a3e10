"""Figures: registered pairs with the map drawn as a deformed grid (ICON paper, Fig. 1)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cyclereg.core.atomic import atomic_path  # noqa: E402

__all__ = ["pairs_figure", "draw_grid"]


def draw_grid(ax, points: np.ndarray, lines: int = 16, color_rows="tab:red", color_cols="tab:blue") -> None:
    """Draw a map ``points (2, H, W)`` (coords in ``[0, 1]``, see :mod:`cyclereg.core.coords`) as a deformed grid.

    Where the map pulls back, the deformed grid lines are the level sets of the map's components:
    the curves of the fixed image that the map sends to straight rows and columns of the moving image.
    """
    levels = np.linspace(0, 1, lines + 1)[1:-1]
    h, w = points.shape[1:]
    extent_y, extent_x = np.arange(h), np.arange(w)
    ax.contour(extent_x, extent_y, points[0], levels=levels, colors=color_rows, linewidths=0.6)
    ax.contour(extent_x, extent_y, points[1], levels=levels, colors=color_cols, linewidths=0.6)


def pairs_figure(path, moving, fixed, warped, points, scores=None, title: str | None = None) -> None:
    """One row per pair: moving, fixed, warped moving, and the map as a deformed grid on the warped
    image. Arrays: images ``(K, H, W)``, maps ``(K, 2, H, W)``; ``scores`` a list of strings per row."""
    k = len(moving)
    fig, axes = plt.subplots(k, 4, figsize=(8, 2.1 * k), squeeze=False)
    for row in range(k):
        lo, hi = float(min(moving[row].min(), fixed[row].min())), float(max(moving[row].max(), fixed[row].max()))
        for col, (image, name) in enumerate([(moving[row], "moving"), (fixed[row], "fixed"),
                                             (warped[row], "warped moving"), (warped[row], "map")]):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if col == 3:
                draw_grid(ax, points[row])
            if row == 0:
                ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if scores:
            axes[row, 0].set_ylabel(scores[row], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
