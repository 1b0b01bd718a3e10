"""Measures on label maps in mm and statistics of Jacobian determinants (cyclereg.core.label_metrics)."""

import itertools
import math

import numpy as np
import pytest
import torch

from cyclereg.core.coords import identity_grid
from cyclereg.core.label_metrics import folded_percent, hd95, label_volumes, log_jacobian_std
from cyclereg.core.metrics import jacobian_determinant

from conftest import small_shape, smooth_image

SPACINGS = {2: (0.7, 1.9), 3: (2.5, 0.6, 1.3)}  # distinct per axis: a reversed order changes every distance


def _label_map(shape, seed: int) -> np.ndarray:
    """A smooth random map of labels 0..3 (blobs, some touching the image border)."""
    image = smooth_image(shape, seed=seed, waves=3)[0, 0].numpy()
    return np.digitize(image, [-0.3, 0.0, 0.3])


def _cube(shape, start, size) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    out[tuple(slice(s, s + size) for s in start)] = 1
    return out


def _brute_hd95(a, b, label, spacing, percentile=95.0) -> float:
    """The definition written out: surface voxels (a face neighbour that is not ``label`` or lies outside
    the image), all pairwise distances in mm, max of the two directed percentiles."""
    def surface_points(m):
        pts = []
        for idx in itertools.product(*(range(n) for n in m.shape)):
            if m[idx] != label:
                continue
            for axis, step in itertools.product(range(m.ndim), (-1, 1)):
                j = list(idx)
                j[axis] += step
                if not 0 <= j[axis] < m.shape[axis] or m[tuple(j)] != label:
                    pts.append(idx)
                    break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    dist = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    return max(np.percentile(dist.min(1), percentile), np.percentile(dist.min(0), percentile))


def test_hd95_of_identical_maps_is_zero(dim, shape):
    a = _label_map(shape, seed=1)
    np.testing.assert_array_equal(hd95(a, a.copy(), [1, 2, 3], SPACINGS[dim]), np.zeros(3))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hd95_of_a_shifted_cube_is_the_shift_in_mm_along_its_axis(dim, k):
    shape = (14,) * dim
    for axis in range(dim):
        start = [4] * dim
        a = _cube(shape, start, 5)
        start[axis] += k
        b = _cube(shape, start, 5)
        spacing = np.array(SPACINGS[dim])
        expected = k * spacing[axis]
        assert hd95(a, b, [1], spacing)[0] == pytest.approx(expected, rel=1e-6)
        # The spacing along the other axes does not matter.
        other = spacing.copy()
        other[[ax for ax in range(dim) if ax != axis]] *= 3.0
        assert hd95(a, b, [1], other)[0] == pytest.approx(expected, rel=1e-6)


def test_hd95_matches_the_brute_force_definition(dim, shape):
    a, b = _label_map(shape, seed=2), _label_map(shape, seed=3)
    labels = [lab for lab in (1, 2, 3) if (a == lab).any() and (b == lab).any()]
    assert labels, "the test maps share no label"
    got = hd95(a, b, labels, SPACINGS[dim])
    expected = [_brute_hd95(a, b, lab, SPACINGS[dim]) for lab in labels]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got > 0)


def test_hd95_is_symmetric(dim, shape):
    a, b = _label_map(shape, seed=4), _label_map(shape, seed=5)
    np.testing.assert_array_equal(hd95(a, b, [1, 2, 3], SPACINGS[dim]), hd95(b, a, [1, 2, 3], SPACINGS[dim]))


def test_hd95_absent_label_is_nan_and_label_in_one_map_is_inf(dim, shape):
    a = _cube(shape, [1] * dim, 3)
    b = np.zeros(shape, dtype=np.int64)
    b[(0,) * dim] = 2
    out = hd95(a, b, [7, 1, 2], SPACINGS[dim])
    assert math.isnan(out[0])
    assert out[1] == math.inf and out[2] == math.inf


def test_hd95_rejects_bad_shapes_and_spacing(dim, shape):
    a = np.zeros(shape, dtype=np.int64)
    with pytest.raises(ValueError, match="a and b"):
        hd95(a, a[..., :-1], [1])
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, [1], (1.0,) * (dim + 1))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, [1], (0.0,) + (1.0,) * (dim - 1))


def test_label_volumes_of_a_known_box_are_count_times_voxel_volume(dim, shape):
    spacing = SPACINGS[dim]
    box = np.zeros(shape, dtype=np.int64)
    box[(slice(1, 4),) * dim] = 2
    box[(0,) * dim] = 5
    voxel = math.prod(spacing)
    np.testing.assert_allclose(label_volumes(box, [2, 5, 9], spacing), [3**dim * voxel, voxel, 0.0])
    # Volumes of all labels add up to the image's volume.
    assert label_volumes(box, [0, 2, 5], spacing).sum() == pytest.approx(math.prod(shape) * voxel)


def test_log_jacobian_std_of_a_constant_positive_det_is_zero():
    assert log_jacobian_std(np.full((5, 4, 3), 1.7)) == pytest.approx(0.0, abs=1e-15)


def test_log_jacobian_std_is_the_std_of_log_det_over_positive_voxels():
    logs = np.array([-0.5, 0.0, 0.2, 1.1])
    det = np.concatenate([np.exp(logs), [0.0, -2.0]])  # folded voxels are left out
    assert log_jacobian_std(det) == pytest.approx(np.std(logs))
    assert math.isnan(log_jacobian_std(np.array([0.0, -1.0])))


def test_folded_percent_counts_det_at_most_zero():
    det = np.array([[1.0, 0.5, 0.0], [-0.1, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert folded_percent(det) == pytest.approx(100.0 * 2 / 12)
    assert folded_percent(np.ones(7)) == 0.0


def test_the_identity_map_has_no_folds_and_no_log_jacobian_spread(dim):
    shape = small_shape(dim)
    det = jacobian_determinant(identity_grid(shape, dtype=torch.float64))[0].numpy()
    assert folded_percent(det) == 0.0
    assert log_jacobian_std(det) == pytest.approx(0.0, abs=1e-12)
