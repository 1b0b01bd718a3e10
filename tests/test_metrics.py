"""Measures of a registration (cyclereg.core.metrics)."""

import math

import pytest
import torch

from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.core.metrics import (count_folds, dice_labels, dice_threshold, displacement_determinant, ic_error,
                                   jacobian_determinant, jacobian_matrix)
from cyclereg.core.transforms import DisplacementField, Identity

from conftest import translation


def _affine_points(shape, matrix, dtype=torch.float64):
    """The map ``x_vox -> matrix @ (x_vox - centre) + centre`` in voxel units, as domain points."""
    d = len(shape)
    scale = voxel_scale(shape, dtype=dtype)
    vox = identity_grid(shape, dtype=dtype) * scale
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=dtype).view(1, d, *([1] * d))
    moved = torch.einsum("ik,nk...->ni...", torch.as_tensor(matrix, dtype=dtype), vox - centre) + centre
    return moved / scale


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (5, 4, 6), (3, 7, 4)])
def test_jacobian_determinant_of_identity_is_one(shape):
    points = identity_grid(shape, dtype=torch.float64).expand(2, -1, *shape)
    det = jacobian_determinant(points)
    assert det.shape == (2, *[n - 1 for n in shape])
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-12, rtol=0)
    assert count_folds(points).tolist() == [0, 0]


def test_jacobian_determinant_of_a_scaling_is_s_to_the_d(dim, shape):
    for s in (0.5, 1.3, 2.0):
        det = jacobian_determinant(_affine_points(shape, s * torch.eye(dim, dtype=torch.float64)))
        torch.testing.assert_close(det, torch.full_like(det, s**dim), atol=1e-10, rtol=0)


def test_jacobian_matrix_entry_i_k_is_d_phi_i_d_x_k(dim, shape):
    """A non-symmetric affine map: the Jacobian is its matrix, not the transpose."""
    a = torch.tensor([[1.2, 0.3, -0.2], [-0.1, 0.9, 0.4], [0.25, 0.05, 1.1]], dtype=torch.float64)[:dim, :dim]
    jac = jacobian_matrix(_affine_points(shape, a))
    assert jac.shape == (1, *[n - 1 for n in shape], dim, dim)
    torch.testing.assert_close(jac, a.expand_as(jac), atol=1e-10, rtol=0)
    torch.testing.assert_close(jacobian_determinant(_affine_points(shape, a)),
                               torch.full(jac.shape[:-2], float(torch.linalg.det(a)), dtype=torch.float64))


def test_jacobian_determinant_is_the_determinant_of_the_jacobian_matrix(dim, shape):
    """For a random non-affine map (some cells folded, a batch of two), cell by cell."""
    points = identity_grid(shape, dtype=torch.float64) + 0.1 * torch.randn(2, dim, *shape, dtype=torch.float64)
    det = jacobian_determinant(points)
    torch.testing.assert_close(det, torch.linalg.det(jacobian_matrix(points)))
    assert bool((det < 0).any()) and bool((det > 0).any())


def test_displacement_determinant_is_the_determinant_of_the_map_it_displaces(dim, shape):
    """From the displacement alone, the same determinants as from the points ``x + D`` (folds included)."""
    displacement = 0.1 * torch.randn(2, dim, *shape, dtype=torch.float64)
    det = displacement_determinant(displacement)
    torch.testing.assert_close(det, jacobian_determinant(identity_grid(shape, dtype=torch.float64) + displacement))
    assert bool((det < 0).any()) and bool((det > 0).any())


def test_count_folds_of_a_swap_of_two_neighbouring_pixels(dim, shape):
    points = identity_grid(shape, dtype=torch.float64).clone().expand(2, -1, *shape).clone()
    assert count_folds(points).tolist() == [0, 0]
    # Item 1: swap the map's values at two neighbouring pixels along the last axis.
    a = (1, slice(None)) + (2,) * dim
    b = (1, slice(None)) + (2,) * (dim - 1) + (3,)
    points[a], points[b] = points[b].clone(), points[a].clone()
    folds = count_folds(points)
    assert folds[0] == 0
    assert folds[1] > 0
    assert folds.dtype in (torch.int64, torch.int32)


def test_count_folds_of_a_reflection_is_every_cell(dim, shape):
    m = torch.eye(dim, dtype=torch.float64)
    m[0, 0] = -1
    assert count_folds(_affine_points(shape, m)).item() == math.prod(n - 1 for n in shape)


def test_dice_threshold():
    a = torch.zeros(3, 1, 6, 6)
    a[:, :, :3] = 1.0
    b = a.clone()
    b[1] = 0
    b[1, :, 3:] = 1.0  # disjoint from a[1]
    b[2] = 0
    b[2, :, :3, :3] = 1.0  # half of a[2]
    dice = dice_threshold(a, b)
    torch.testing.assert_close(dice, torch.tensor([1.0, 0.0, 2 * 9 / (18 + 9)], dtype=torch.float64))
    # Both empty counts as a perfect match; the threshold is applied strictly.
    assert dice_threshold(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)).item() == 1.0
    assert dice_threshold(a[:1], a[:1] * 0.4, threshold=0.3).item() == 1.0


def test_dice_labels():
    a = torch.tensor([[[[1, 1, 2, 2], [0, 0, 3, 3]]]])
    b = torch.tensor([[[[1, 2, 2, 2], [0, 0, 0, 0]]]])
    dice = dice_labels(a, b, [1, 2, 3, 4])
    assert dice.shape == (1, 4)
    torch.testing.assert_close(dice[0, :3], torch.tensor([2 * 1 / 3, 2 * 2 / 5, 0.0], dtype=torch.float64))
    assert torch.isnan(dice[0, 3])  # absent from both
    assert torch.all(dice_labels(a, a, [1, 2, 3]) == 1)


def test_ic_error_is_zero_for_an_exact_inverse_pair_of_translations(dim, shape):
    # Constant fields stay constant when border clamping extends them, so the pair is exactly
    # inverse even where Φ_BA sends a grid point outside the domain.
    t = translation(shape, [0.4, -0.3, 0.2][:dim], n=2, dtype=torch.float64)
    like = torch.zeros(2, 1, *shape, dtype=torch.float64)
    err = ic_error(DisplacementField(t), DisplacementField(-t), shape, like)
    assert err.shape == (2,)
    assert err.abs().max() < 1e-12
    assert ic_error(Identity(), Identity(), shape, like).abs().max() == 0


def test_ic_error_is_the_distance_in_voxels_otherwise(dim, shape):
    like = torch.zeros(1, 1, *shape, dtype=torch.float64)
    shift = [1.0, 0.5, 2.0][:dim]
    t = DisplacementField(translation(shape, shift, dtype=torch.float64))
    # t ∘ t moves every point by 2 * shift voxels.
    expected = 2 * math.sqrt(sum(s * s for s in shift))
    torch.testing.assert_close(ic_error(t, t, shape, like), torch.tensor([expected], dtype=torch.float64))
