"""Orthogonal-slice figures of a registered pair (cyclereg.io.slices)."""

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from cyclereg.io import slices
from cyclereg.core.coords import identity_grid
from cyclereg.io.slices import orthogonal_slices_figure

from conftest import smooth_field, smooth_image


def _pair(shape):
    fixed = smooth_image(shape, seed=1)[0, 0].numpy()
    moving = smooth_image(shape, seed=2)[0, 0].numpy()
    points = (identity_grid(shape, dtype=torch.float32) + smooth_field(shape, seed=3, voxels=1.0))[0].numpy()
    labels = np.digitize(fixed, [-0.2, 0.2])
    return fixed, moving, points, labels


@pytest.fixture
def captured(monkeypatch):
    """The figures that orthogonal_slices_figure closes, kept open for inspection."""
    figures, close = [], plt.close
    monkeypatch.setattr(slices.plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "labels+points"])
def test_writes_a_readable_png(tmp_path, dim, shape, with_extras):
    fixed, moving, points, labels = _pair(shape)
    extras = dict(points=points, fixed_labels=labels, warped_labels=labels[::-1].copy(), title="pair 0") if with_extras else {}
    path = tmp_path / "slices.png"
    orthogonal_slices_figure(path, fixed, moving, moving, **extras)
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert image.std() > 0  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["slices.png"]  # no temporary file left


def test_layout_rows_columns_overlays_and_grid(tmp_path, dim, shape, captured):
    fixed, moving, points, labels = _pair(shape)
    orthogonal_slices_figure(tmp_path / "a.png", fixed, moving, moving, points=points, fixed_labels=labels,
                             warped_labels=labels)
    orthogonal_slices_figure(tmp_path / "b.png", fixed, moving, moving)
    with_all, plain = (np.array(fig.axes).reshape(-1, len(fig.axes) // (3 if dim == 3 else 1)) for fig in captured)
    assert with_all.shape == (3 if dim == 3 else 1, 5) and plain.shape == (3 if dim == 3 else 1, 4)
    for row in with_all:
        assert [len(ax.images) for ax in row] == [2, 1, 2, 1, 1]  # overlays on fixed and warped
        assert len(row[4].collections) > 0 and len(row[2].collections) == 0  # the grid on the map panel only
    for row in plain:
        assert [len(ax.images) for ax in row] == [1, 1, 1, 1]


def test_the_identity_map_draws_the_straight_grid_of_each_slice(tmp_path, dim, shape, monkeypatch):
    """The in-plane components of the map, in order, restricted to the mid slice."""
    drawn = []
    monkeypatch.setattr(slices, "draw_grid", lambda ax, pts: drawn.append(pts))
    fixed, moving, _, _ = _pair(shape)
    points = identity_grid(shape, dtype=torch.float64)[0].numpy()
    orthogonal_slices_figure(tmp_path / "id.png", fixed, moving, fixed, points=points)
    through_axes = range(3) if dim == 3 else [None]
    assert len(drawn) == len(through_axes)
    for pts, through in zip(drawn, through_axes):
        plane = [n for k, n in enumerate(shape) if k != through]
        np.testing.assert_allclose(pts, identity_grid(plane, dtype=torch.float64)[0].numpy())


def test_spacing_sets_each_panel_aspect(tmp_path, captured):
    shape = (8, 7, 6)
    fixed, moving, points, _ = _pair(shape)
    spacing, moving_spacing = (3.0, 1.5, 0.5), (1.0, 1.0, 2.0)
    orthogonal_slices_figure(tmp_path / "s.png", fixed, moving, fixed, points=points, spacing=spacing,
                             moving_spacing=moving_spacing)
    axes = np.array(captured[0].axes).reshape(3, 5)
    # Pixel height / width = spacing of the slice's row axis / spacing of its column axis.
    for row, (r, c) in enumerate([(1, 2), (0, 2), (0, 1)]):
        for col in (0, 2, 3, 4):
            assert axes[row, col].get_aspect() == pytest.approx(spacing[r] / spacing[c])
        assert axes[row, 1].get_aspect() == pytest.approx(moving_spacing[r] / moving_spacing[c])


@pytest.mark.parametrize("argument", ["warped", "points", "fixed_labels", "warped_labels", "moving", "spacing"])
def test_a_bad_argument_raises_value_error_and_writes_nothing(tmp_path, dim, shape, argument):
    fixed, moving, points, labels = _pair(shape)
    kwargs = dict(fixed=fixed, moving=moving, warped=fixed, points=points, fixed_labels=labels, warped_labels=labels)
    bad = {"warped": fixed[..., :-1], "points": points[:, ..., :-1], "fixed_labels": labels.T,
           "warped_labels": labels[None], "moving": moving[0], "spacing": (1.0,) * (dim + 1)}
    kwargs[argument] = bad[argument]
    with pytest.raises(ValueError, match=argument):
        orthogonal_slices_figure(tmp_path / "bad.png", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    fixed, moving, points, _ = _pair((8, 7, 6))
    path = tmp_path / "slices.png"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        orthogonal_slices_figure(path, fixed, moving, fixed, points=points)
    assert [p.name for p in tmp_path.iterdir()] == ["slices.png"] and path.read_bytes() == b"old"
