"""Augmentation: seeded, 2D and 3D, diffeomorphic deformations with their inverses, and a ground-truth
map that undoes the augmentation of a pair made from one scan."""

from __future__ import annotations

import itertools

import pytest
import torch

from cyclereg.data.augment import (AugmentSettings, apply_flips_permutation, augment_pair,
                              random_affine_map, random_deformation, random_flips_permutation, random_intensity,
                              random_velocity)
from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.core.transforms import exp_velocity
from cyclereg.data.datasets import random_affine
from cyclereg.core.metrics import jacobian_determinant
from cyclereg.core.transforms import map_on_grid, warp

from conftest import smooth_image

# Large enough that a deformation of a few voxels RMS on 4 control nodes per axis is moderate.
LARGE = {2: (40, 33), 3: (32, 28, 24)}
CUBIC = {2: (10, 10), 3: (6, 6, 6)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def voxel_error(points: torch.Tensor, shape) -> torch.Tensor:
    """Distance in voxels of points on the grid of ``shape`` to the grid itself: ``(N, *shape)``."""
    grid = identity_grid(shape, dtype=points.dtype)
    return ((points - grid) * voxel_scale(shape, dtype=points.dtype)).norm(dim=1)


def interior(shape):
    return (slice(None), slice(None)) + tuple(slice(n // 4, n - n // 4) for n in shape)


def test_seeded(shape):
    img = smooth_image(shape, n=2).sigmoid()
    settings = AugmentSettings(deform=1.0, affine=0.05, flips=True, intensity=True)
    runs = [augment_pair(img, img, settings, gen(seed)) for seed in (3, 3, 4)]
    grid = identity_grid(shape).expand(2, -1, *shape)
    for k in range(2):
        assert torch.equal(runs[0][k], runs[1][k])
        assert not torch.allclose(runs[0][k], runs[2][k])
    assert torch.equal(runs[0][2](grid), runs[1][2](grid))
    assert torch.equal(random_velocity(2, shape, 1.0, 4, gen(0)), random_velocity(2, shape, 1.0, 4, gen(0)))
    assert not torch.allclose(random_velocity(2, shape, 1.0, 4, gen(0)), random_velocity(2, shape, 1.0, 4, gen(1)))


def test_velocity_rms_in_voxels_and_no_flow_across_faces(dim):
    shape = LARGE[dim]
    v = random_velocity(4, shape, 2.5, 5, gen(0), dtype=torch.float64)
    assert v.shape == (4, dim, *shape)
    rms = (v * voxel_scale(shape, dtype=v.dtype)).square().sum(1).flatten(1).mean(1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 2.5), rtol=0.1)
    for k in range(dim):
        assert v[:, k].select(k + 1, 0).abs().max() < 1e-12 and v[:, k].select(k + 1, -1).abs().max() < 1e-12
        assert v[:, k].select(k + 1, 1).abs().max() > 1e-3  # only the normal component vanishes


def test_exp_of_minus_v_is_the_inverse(dim):
    shape = LARGE[dim]
    v = random_velocity(4, shape, 2.0, 4, gen(1))
    phi, phi_inv = exp_velocity(v), exp_velocity(-v)
    for composed in (phi @ phi_inv, phi_inv @ phi):
        err = voxel_error(map_on_grid(composed, shape, v), shape)
        assert err.max() < 0.5 and err.mean() < 0.05
    assert voxel_error(map_on_grid(phi, shape, v), shape).mean() > 1.0  # while phi itself moves points


def test_zero_magnitude_is_the_identity(shape):
    phi, phi_inv = random_deformation(2, shape, 0.0, 5, gen(0))
    grid = identity_grid(shape).expand(2, -1, *shape)
    assert torch.equal(phi(grid), grid) and torch.equal(phi_inv(grid), grid)


def test_exp_velocity_is_diffeomorphic(dim):
    shape = LARGE[dim]
    v = random_velocity(4, shape, 3.0, {2: 5, 3: 4}[dim], gen(2))  # strong: the 3D field has 3 components
    assert (jacobian_determinant(map_on_grid(exp_velocity(v), shape, v)) > 0).all()
    # The same field used as a displacement folds: the test is not trivially satisfied.
    assert (jacobian_determinant(identity_grid(shape) + v) < 0).any()


def test_affine_map_matches_data_random_affine_and_inverts(shape):
    img = smooth_image(shape, n=3)
    affine = random_affine_map(3, len(shape), 0.1, gen(5))
    assert torch.allclose(warp(img, affine), random_affine(img, 0.1, gen(5)), atol=1e-5)
    affine = random_affine_map(3, len(shape), 0.1, gen(5), dtype=torch.float64)
    points = torch.rand(3, len(shape), 5, 4, dtype=torch.float64)
    assert torch.allclose((affine.inverse() @ affine)(points), points, atol=1e-12)
    assert torch.allclose((affine @ affine.inverse())(points), points, atol=1e-12)


@pytest.mark.parametrize("settings", [AugmentSettings(deform=2.0, smoothness=4),
                                      AugmentSettings(affine=0.05),
                                      AugmentSettings(deform=2.0, smoothness=4, affine=0.15, flips=True)],
                         ids=["deform", "affine", "all"])
def test_truth_undoes_the_augmentation_of_one_scan(dim, settings):
    shape = LARGE[dim]
    img = smooth_image(shape, n=3, seed=1)
    moving, fixed, truth = augment_pair(img, img, settings, gen(0))
    inside = interior(shape)
    truth_error = (warp(moving, truth) - fixed)[inside].square().mean()
    identity_error = (moving - fixed)[inside].square().mean()
    assert truth_error < 0.05 * identity_error
    # The truth of another pair of the batch does not fit: the maps are per item.
    rolled = warp(moving, truth.take(torch.tensor([1, 2, 0])))
    assert (rolled - fixed)[inside].square().mean() > 10 * truth_error


def test_default_settings_change_nothing(shape):
    img = smooth_image(shape, n=2)
    moving, fixed, truth = augment_pair(img, img + 1, AugmentSettings(), gen(0))
    assert torch.equal(moving, img) and torch.equal(fixed, img + 1)
    grid = identity_grid(shape).expand(2, -1, *shape)
    assert torch.equal(truth(grid), grid)


def test_apply_flips_permutation(dim):
    shape = CUBIC[dim]
    img = smooth_image(shape, n=2)
    flipped = apply_flips_permutation(img, ((True,) + (False,) * (dim - 1), tuple(range(dim))))
    assert torch.equal(flipped[:, :, 0], img[:, :, -1]) and torch.equal(flipped[:, :, 1], img[:, :, -2])
    order = tuple(range(dim))[::-1]
    assert torch.equal(apply_flips_permutation(img, ((False,) * dim, order)), img.permute(0, 1, *(2 + o for o in order)))
    with pytest.raises(ValueError, match="different sizes"):
        apply_flips_permutation(smooth_image(LARGE[dim]), ((False,) * dim, order))
    with pytest.raises(ValueError, match="square or cubic"):
        augment_pair(smooth_image(LARGE[dim]), smooth_image(LARGE[dim]), AugmentSettings(permute=True), gen(0))


def test_pair_gets_the_same_flips_and_permutation(dim):
    shape = CUBIC[dim]
    moving, fixed = smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)
    candidates = [(f, o) for f in itertools.product((False, True), repeat=dim) for o in itertools.permutations(range(dim))]
    used = set()
    for seed in range(8):
        moving_aug, fixed_aug, _ = augment_pair(moving, fixed, AugmentSettings(flips=True, permute=True), gen(seed))
        matches = [c for c in candidates if torch.equal(apply_flips_permutation(moving, c), moving_aug)]
        assert len(matches) == 1 and torch.equal(apply_flips_permutation(fixed, matches[0]), fixed_aug)
        used.add(matches[0])
        assert random_flips_permutation(dim, gen(seed), flips=False) == ((False,) * dim, tuple(range(dim)))
    assert len(used) > 2


def test_random_intensity(shape):
    raw = smooth_image(shape, n=3)  # partly outside [0, 1], which random_intensity clamps
    before = raw.clone()
    out = random_intensity(raw, gen(0), gamma=0.3, scale=0.1, noise=0.02, bias=0.2)
    assert out.shape == raw.shape and torch.equal(raw, before)
    img = raw.sigmoid()
    assert not torch.allclose(random_intensity(img, gen(0)), img, atol=1e-3)
    assert torch.equal(random_intensity(img, gen(0), gamma=0, scale=0, noise=0, bias=0), img)
    # Gamma and scale alone keep the order of intensities in each image, and are drawn per image.
    monotone = random_intensity(img, gen(1), gamma=0.5, scale=0.2, noise=0)
    order = img.flatten(1).argsort(1)
    assert (monotone.flatten(1).gather(1, order).diff(dim=1) >= 0).all()
    for strengths in (dict(gamma=0.3, scale=0), dict(gamma=0, scale=0.1)):
        same = random_intensity(img[:1].expand(3, *img.shape[1:]), gen(1), noise=0, **strengths)
        assert not torch.allclose(same[0], same[1]) and not torch.allclose(same[1], same[2])
    # A bias field alone is a positive factor.
    ratio = random_intensity(img, gen(2), gamma=0, scale=0, noise=0, bias=0.3) / img
    assert (ratio > 0).all() and not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-2)
