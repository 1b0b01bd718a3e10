"""THE coordinate convention (cyclereg.core.coords), pinned.

Maps pull back: ``warped(x) = moving(Φ(x))``. If the moving image is the original with its content
moved by +1 voxel along tensor axis k (``moving[i] = original[i - 1]``), then
``warped(i) = moving(i + 1) = original(i)``: the map that recovers the original is ``Φ = Id + D``
with ``D_k = +1 / (n_k - 1)`` and every other component zero.
"""

import pytest
import torch
import torch.nn.functional as F

from cyclereg.core.coords import identity_grid, spatial_dims, to_grid_sample, voxel_scale
from cyclereg.core.transforms import DisplacementField, sample, warp

from conftest import rand_points, smooth_image


def _shift_field(shape, axis, value, dtype):
    d = len(shape)
    field = torch.zeros((1, d, *shape), dtype=dtype)
    field[:, axis] = value
    return field


def _interior_along(axis, shape):
    """Index of every voxel except the last one along ``axis`` (its source is outside the image)."""
    return (slice(None), slice(None)) + tuple(slice(0, n - 1) if a == axis else slice(None) for a, n in enumerate(shape))


def test_shift_by_one_voxel_is_recovered_by_plus_one_voxel_along_the_same_component(dim, shape):
    original = smooth_image(shape, dtype=torch.float64)
    for axis in range(dim):
        n = shape[axis]
        moving = torch.roll(original, 1, dims=2 + axis)  # content moved by +1 voxel along `axis`
        keep = _interior_along(axis, shape)

        warped = warp(moving, DisplacementField(_shift_field(shape, axis, 1.0 / (n - 1), torch.float64)))
        torch.testing.assert_close(warped[keep], original[keep], atol=1e-10, rtol=0)

        # The opposite sign moves the content further instead of back.
        wrong_sign = warp(moving, DisplacementField(_shift_field(shape, axis, -1.0 / (n - 1), torch.float64)))
        assert (wrong_sign[keep] - original[keep]).abs().max() > 0.05

        # The same shift on any other component does not recover the image either.
        for other in range(dim):
            if other == axis:
                continue
            wrong_axis = warp(moving, DisplacementField(_shift_field(shape, other, 1.0 / (shape[other] - 1), torch.float64)))
            assert (wrong_axis[keep] - original[keep]).abs().max() > 0.05


def test_identity_grid_values_and_corners(dim, shape):
    grid = identity_grid(shape)
    assert grid.shape == (1, dim, *shape)
    assert grid.dtype == torch.float32
    first = (0, slice(None)) + (0,) * dim
    last = (0, slice(None)) + (-1,) * dim
    torch.testing.assert_close(grid[first], torch.zeros(dim))
    torch.testing.assert_close(grid[last], torch.ones(dim))
    for k, n in enumerate(shape):
        # Component k is i / (n_k - 1) along tensor axis k and constant along the others.
        expected = (torch.arange(n, dtype=torch.float32) / (n - 1)).view(*[n if a == k else 1 for a in range(dim)])
        torch.testing.assert_close(grid[0, k], expected.expand(*shape))


def test_identity_grid_dtype_and_size_one_axis():
    grid = identity_grid((1, 5), dtype=torch.float64)
    assert grid.dtype == torch.float64
    assert torch.all(grid[0, 0] == 0)


def test_voxel_scale_is_size_minus_one():
    scale = voxel_scale((12, 9, 5))
    assert scale.shape == (1, 3, 1, 1, 1)
    assert scale.flatten().tolist() == [11.0, 8.0, 4.0]


def test_to_grid_sample_reverses_components_and_rescales(dim, shape):
    points = torch.rand(2, dim, *shape)
    grid = to_grid_sample(points)
    assert grid.shape == (2, *shape, dim)
    for j in range(dim):
        torch.testing.assert_close(grid[..., j], 2 * points[:, dim - 1 - j] - 1)


def test_sampling_the_identity_grid_returns_the_points(dim, shape):
    """The coordinate ramps, sampled anywhere in the domain, give back the coordinates: the bridge
    to grid_sample agrees with identity_grid on component order and on align_corners."""
    grid = identity_grid(shape, dtype=torch.float64)
    points = rand_points(3, dim)
    torch.testing.assert_close(sample(grid.expand(3, -1, *shape), points), points, atol=1e-12, rtol=0)


def test_grid_sample_bridge_matches_an_explicit_voxel_lookup(dim, shape):
    image = smooth_image(shape, dtype=torch.float64)
    index = [torch.randint(0, n, (7,)) for n in shape]
    points = torch.stack([i.double() / (n - 1) for i, n in zip(index, shape)])[None, :, :, None]
    if dim == 3:
        points = points[..., None]
    values = sample(image, points).flatten()
    torch.testing.assert_close(values, image[(0, 0, *index)], atol=1e-12, rtol=0)
    # grid_sample itself sees the reversed order.
    direct = F.grid_sample(image, to_grid_sample(points), align_corners=True).flatten()
    torch.testing.assert_close(direct, values)


def test_spatial_dims():
    assert spatial_dims(torch.zeros(1, 1, 4, 4)) == 2
    assert spatial_dims(torch.zeros(1, 1, 4, 4, 4)) == 3
    with pytest.raises(ValueError, match="expected a tensor"):
        spatial_dims(torch.zeros(4, 4))
