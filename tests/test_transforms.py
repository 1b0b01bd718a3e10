"""Transforms as functions of points, and warping (cyclereg.core.transforms)."""

import pytest
import torch

from cyclereg.core.coords import identity_grid
from cyclereg.core.transforms import Composed, DisplacementField, Identity, map_on_grid, sample, sample_axes, warp

from conftest import rand_points, smooth_field, smooth_image, translation


def _crop(tensor, lo, hi):
    """Crop spatial axis k of ``(N, C, *spatial)`` to ``lo[k]:n - hi[k]``."""
    return tensor[(slice(None), slice(None)) + tuple(slice(a, n - b) for a, b, n in zip(lo, hi, tensor.shape[2:]))]


def test_identity_warp_returns_the_input_exactly(dim, shape):
    image = smooth_image(shape, n=2)
    assert torch.equal(warp(image, Identity()), image)
    # A zero displacement field goes through grid_sample and still returns the input.
    zero = DisplacementField(torch.zeros(2, dim, *shape, dtype=torch.float64))
    image64 = image.double()
    torch.testing.assert_close(warp(image64, zero), image64, atol=1e-12, rtol=0)


def test_identity_warp_to_another_shape_resamples():
    image = smooth_image((9, 7))
    out = warp(image, Identity(), shape=(5, 4))
    assert out.shape == (1, 1, 5, 4)
    # Corner voxels stay where they are ([0, 1] domain, align_corners).
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        torch.testing.assert_close(out[0, 0][corner], image[0, 0][corner])


def test_integer_voxel_shift_is_exact_in_the_interior(dim, shape):
    image = smooth_image(shape, dtype=torch.float64)
    shift = [2, -1, 1][:dim]
    warped = warp(image, DisplacementField(translation(shape, shift, dtype=torch.float64)))
    # warped[i] = image[i + shift], wherever i + shift lies inside the image.
    lo = [max(0, -s) for s in shift]
    hi = [max(0, s) for s in shift]
    src_lo = [max(0, s) for s in shift]
    src_hi = [max(0, -s) for s in shift]
    torch.testing.assert_close(_crop(warped, lo, hi), _crop(image, src_lo, src_hi), atol=1e-10, rtol=0)


def test_translation_composed_with_its_inverse_is_identity(dim, shape):
    t = DisplacementField(translation(shape, [1.5, -0.7, 0.3][:dim], n=2, dtype=torch.float64))
    t_inv = DisplacementField(-t.field)
    points = rand_points(2, dim, low=-0.1, high=1.1)  # inside and outside the domain
    for composed in (t @ t_inv, t_inv @ t, Composed(t, t_inv)):
        torch.testing.assert_close(composed(points), points, atol=1e-12, rtol=0)
        assert composed.displacement(points).abs().max() < 1e-12
    # Not the identity without the inverse.
    assert ((t @ t)(points) - points).abs().max() > 0.1


def test_composition_applies_the_inner_map_first(dim, shape):
    outer = DisplacementField(smooth_field(shape, seed=1, voxels=2.0, dtype=torch.float64))
    inner = DisplacementField(translation(shape, [0.6, 0.2, -0.4][:dim], dtype=torch.float64))
    points = rand_points(1, dim)
    torch.testing.assert_close((outer @ inner)(points), outer(inner(points)), atol=1e-12, rtol=0)
    assert ((inner @ outer)(points) - outer(inner(points))).abs().max() > 1e-3


def test_warping_twice_equals_warping_by_the_composition(dim, shape):
    """(I ∘ A) ∘ B = I ∘ (A ∘ B): exact for integer shifts away from the border."""
    image = smooth_image(shape, dtype=torch.float64)
    a = DisplacementField(translation(shape, [1] + [0] * (dim - 1), dtype=torch.float64))
    b = DisplacementField(translation(shape, [0] * (dim - 1) + [1], dtype=torch.float64))
    twice = warp(warp(image, a), b)
    once = warp(image, a @ b)
    hi = [1] * dim
    torch.testing.assert_close(_crop(twice, [0] * dim, hi), _crop(once, [0] * dim, hi), atol=1e-10, rtol=0)


def test_take_selects_batch_items(dim, shape):
    fields = smooth_field(shape, n=3, seed=2, voxels=1.0, dtype=torch.float64)
    phi = DisplacementField(fields)
    index = torch.tensor([2, 0])
    taken = phi.take(index)
    assert torch.equal(taken.field, fields[index])
    other = DisplacementField(smooth_field(shape, n=3, seed=3, dtype=torch.float64))
    points = rand_points(1, dim)
    torch.testing.assert_close((phi @ other).take(index)(points), (phi.take(index) @ other.take(index))(points))
    full = (phi @ other)(points)
    torch.testing.assert_close((phi @ other).take(index)(points), full[index])
    ident = Identity()
    assert ident.take(index) is ident


def test_nearest_warp_of_a_label_map_keeps_only_its_values(dim, shape):
    labels = torch.zeros(1, 1, *shape)
    labels[(0, 0) + tuple(slice(0, n // 2) for n in shape)] = 2.0
    labels[(0, 0) + tuple(slice(n // 2, n) for n in shape)] = 5.0
    labels[(0, 0) + (slice(0, 2),) * dim] = 7.0
    phi = DisplacementField(smooth_field(shape, seed=4, voxels=2.5))
    nearest = warp(labels, phi, mode="nearest")
    assert set(nearest.unique().tolist()) <= {0.0, 2.0, 5.0, 7.0}
    assert not torch.equal(nearest, labels)  # the map did move something
    linear = warp(labels, phi)
    assert not set(linear.unique().tolist()) <= {0.0, 2.0, 5.0, 7.0}  # sanity: linear mixes labels


def test_map_on_grid_and_warp_to_a_finer_grid(dim, shape):
    phi = DisplacementField(translation(shape, [0.5] * dim))
    image = smooth_image(shape)
    fine = tuple(2 * n - 1 for n in shape)
    points = map_on_grid(phi, fine, image)
    assert points.shape == (1, dim, *fine)
    expected = identity_grid(fine) + phi.field[(slice(None), slice(None)) + (slice(0, 1),) * dim]
    torch.testing.assert_close(points, expected)
    assert warp(image, phi, shape=fine).shape == (1, 1, *fine)


def test_displacement_field_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match="DisplacementField"):
        DisplacementField(torch.zeros(1, 3, 8, 8))


def test_sample_shares_points_of_batch_one(dim, shape):
    values = smooth_image(shape, n=3)
    points = rand_points(1, dim, dtype=torch.float32)
    out = sample(values, points)
    assert out.shape == (3, 1, *points.shape[2:])
    torch.testing.assert_close(out[1:2], sample(values[1:2], points))


def _off_grid_points(shape, n, extra):
    """Points strictly inside the domain at fractional voxel offsets in [0.2, 0.8] (no grid-node kinks)."""
    points = []
    for n_k in shape:
        cell = torch.randint(0, n_k - 1, (n, *extra))
        frac = 0.2 + 0.6 * torch.rand(n, *extra, dtype=torch.float64)
        points.append((cell + frac) / (n_k - 1))
    return torch.stack(points, 1)


@pytest.mark.parametrize("shape", [(4, 3), (3, 4, 3)], ids=["2d", "3d"])
def test_sample_gradcheck(shape):
    d = len(shape)
    values = torch.randn(2, 2, *shape, dtype=torch.float64, requires_grad=True)
    points = _off_grid_points(shape, 2, (3, 2, 2)[:d]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, p: sample(v, p), (values, points), eps=1e-6, atol=1e-6)
    # Points outside the domain (border padding) still have a gradient w.r.t. values.
    outside = rand_points(2, d, (3, 2, 2), low=-1.0, high=2.0)
    assert torch.autograd.gradcheck(lambda v: sample(v, outside), (values,), eps=1e-6, atol=1e-6)


def test_maps_on_their_own_grid_skip_interpolation_and_agree_with_it(shape):
    """map_on_grid reads a field's values at its own nodes instead of interpolating them."""
    outer, inner = DisplacementField(smooth_field(shape, 2, seed=1)), DisplacementField(smooth_field(shape, 2, seed=2))
    like = torch.zeros(2, 1, *shape)
    grid = identity_grid(shape).expand(2, len(shape), *shape)
    for phi in (inner, outer @ inner, Identity() @ inner):
        torch.testing.assert_close(map_on_grid(phi, shape, like), phi(grid), rtol=0, atol=1e-6)
    assert torch.equal(map_on_grid(inner, shape, like), grid + inner.field)


def test_resize_is_sampling_at_the_identity_of_the_new_grid(dim):
    from cyclereg.core.transforms import resize

    values = torch.rand(2, 3, *([7, 9, 5][:dim]), dtype=torch.float64)
    size = [13, 6, 9][:dim]
    torch.testing.assert_close(resize(values, size), sample(values, identity_grid(size, dtype=torch.float64)))


def test_sampling_axis_by_axis_equals_sampling_at_the_grid_they_span(dim, shape):
    """Fine and coarse axes, points outside the domain (the border value), a single-node axis."""
    values = torch.randn(2, 3, *shape[:-1], 1)
    axes = [torch.rand(n) * 1.4 - 0.2 for n in (13, 5, 4)[:dim]]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    torch.testing.assert_close(sample_axes(values, axes), sample(values, points), atol=1e-5, rtol=0)

