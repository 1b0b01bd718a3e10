"""Similarities and regularisers (cyclereg.losses)."""


import pytest
import torch
import torch.nn.functional as F

from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.losses import (LNCC, MSE, NCC, SIMILARITIES, Diffusion, GradientInverseConsistency, InverseConsistency,
                             diffusion, gradient_inverse_consistency, inverse_consistency, lncc, lncc_box, lncc_box_to, mse, ncc,
                             random_points)
from cyclereg.core.filters import box_sum
from cyclereg.core.transforms import DisplacementField, Identity

from conftest import rand_points, smooth_field, smooth_image, translation

SIMS = [("mse", mse), ("ncc", ncc), ("lncc", lncc)]


# --- similarities -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,fn", SIMS)
def test_similarity_is_zero_for_identical_images_and_positive_otherwise(name, fn, dim, shape):
    # Textured images: the ε of ncc/lncc is negligible against their (local) variance.
    a = torch.randn(2, 1, *shape)
    b = torch.randn(2, 1, *shape)
    same = fn(a, a)
    assert same.shape == (2,)
    assert same.abs().max() < 1e-3
    assert torch.all(fn(a, b) > 0.05)
    assert SIMILARITIES[name] is fn


def test_mse_value():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.zeros(2, 1, 4, 4)
    b[1, 0, 0, :2] = 2.0  # 2 of 16 voxels differ by 2
    torch.testing.assert_close(mse(a, b), torch.tensor([0.0, 8.0 / 16]))


# The local correlations zero-pad their windows, as the authors' do, so an intensity offset changes
# them near the border: they ignore a scaling, and an offset only inside.
@pytest.mark.parametrize("name,fn,offset", [("ncc", ncc, 0.7), ("lncc", lncc, 0.0)])
def test_correlation_similarities_ignore_affine_intensity_changes(name, fn, offset, dim, shape):
    a = torch.randn(2, 1, *shape, dtype=torch.float64)
    b = 0.5 * a + torch.randn(2, 1, *shape, dtype=torch.float64)  # partly correlated
    assert fn(a, 3.0 * a + offset).abs().max() < 1e-3
    torch.testing.assert_close(fn(2.5 * a - offset, b), fn(a, b), atol=2e-3, rtol=0)
    torch.testing.assert_close(fn(a, 0.5 * b + offset), fn(a, b), atol=2e-3, rtol=0)
    # A negative scale anti-correlates.
    assert torch.all(fn(a, -a) > 1.9)
    # MSE does see the change (sanity).
    assert torch.all(mse(a, 3.0 * a + 0.7) > 0.1)


def test_functional_and_module_forms_agree(dim, shape):
    a = smooth_image(shape, n=3, seed=1)
    b = smooth_image(shape, n=3, seed=2)
    torch.testing.assert_close(MSE()(a, b), mse(a, b).mean())
    torch.testing.assert_close(NCC()(a, b), ncc(a, b).mean())
    torch.testing.assert_close(LNCC(sigma=1.5)(a, b), lncc(a, b, sigma=1.5).mean())
    assert not torch.allclose(lncc(a, b, sigma=1.5), lncc(a, b, sigma=3.0))  # sigma is passed on
    phi = DisplacementField(smooth_field(shape, n=3, seed=3, voxels=1.5))
    psi = DisplacementField(smooth_field(shape, n=3, seed=4, voxels=1.5))
    points = random_points(3, shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(InverseConsistency()(phi, psi, points), inverse_consistency(phi, psi, points).mean())
    torch.testing.assert_close(GradientInverseConsistency(delta=0.1)(phi, psi, points),
                               gradient_inverse_consistency(phi, psi, points, delta=0.1).mean())
    torch.testing.assert_close(Diffusion()(phi.field), diffusion(phi.field).mean())
    # Module with noise: reproducible under the same global seed and different from no noise.
    torch.manual_seed(5)
    noisy = InverseConsistency(noise=0.5)(phi, psi, points)
    torch.manual_seed(5)
    assert torch.equal(noisy, InverseConsistency(noise=0.5)(phi, psi, points))
    assert not torch.allclose(noisy, InverseConsistency()(phi, psi, points))


# --- random points ----------------------------------------------------------------------------

def test_random_points_are_grid_points_jittered_by_a_voxel(dim, shape):
    g = torch.Generator().manual_seed(0)
    points = random_points(64, shape, dtype=torch.float64, generator=g)
    assert points.shape == (64, dim, *shape)
    jitter_vox = (points - identity_grid(shape, dtype=torch.float64)) * voxel_scale(shape, dtype=torch.float64)
    std = jitter_vox.transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(std, torch.ones(dim, dtype=torch.float64), atol=0.05, rtol=0)
    again = random_points(64, shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, again)


# --- inverse consistency (ICON) --------------------------------------------------------------

def test_inverse_consistency_is_zero_for_identity_maps(dim, shape):
    points = random_points(2, shape, dtype=torch.float64)
    assert torch.all(inverse_consistency(Identity(), Identity(), points) == 0)
    zero = DisplacementField(torch.zeros(2, dim, *shape, dtype=torch.float64))
    assert torch.all(inverse_consistency(zero, zero, points) == 0)


def test_inverse_consistency_is_zero_for_an_exact_inverse_pair_of_translations(dim, shape):
    t = translation(shape, [0.7, -1.2, 0.4][:dim], n=2, dtype=torch.float64)
    points = random_points(2, shape, dtype=torch.float64)  # some of them outside the domain
    loss = inverse_consistency(DisplacementField(t), DisplacementField(-t), points)
    assert loss.shape == (2,)
    assert loss.max() < 1e-24


def test_inverse_consistency_value_for_two_translations(dim, shape):
    a, b = [0.7, -1.2, 0.4][:dim], [0.3, 0.2, 0.6][:dim]
    points = random_points(1, shape, dtype=torch.float64)
    loss = inverse_consistency(DisplacementField(translation(shape, a, dtype=torch.float64)),
                               DisplacementField(translation(shape, b, dtype=torch.float64)), points)
    # Residual (a + b) voxels, in domain units, squared, averaged over points and components.
    expected = sum(((x + y) / (n - 1)) ** 2 for x, y, n in zip(a, b, shape)) / dim
    torch.testing.assert_close(loss, torch.tensor([expected], dtype=torch.float64))


def _pair_swap_field(shape, dtype=torch.float64):
    """Displacements that swap neighbouring pixels (0↔1, 2↔3, ...) along the last axis."""
    d = len(shape)
    n = shape[-1]
    field = torch.zeros(1, d, *shape, dtype=dtype)
    for j in range(0, n - 1, 2):
        field[..., j] = torch.zeros(())
        field[(0, d - 1) + (slice(None),) * (d - 1) + (j,)] = 1.0 / (n - 1)
        field[(0, d - 1) + (slice(None),) * (d - 1) + (j + 1,)] = -1.0 / (n - 1)
    return field


def test_icon_fig3_a_pixel_swap_is_inverse_consistent_only_on_the_grid(dim, shape):
    """ICON paper, Fig. 3: a map that swaps neighbouring pixels is its own inverse at the grid
    points, so a consistency loss evaluated there cannot see it; off-grid points do."""
    swap = DisplacementField(_pair_swap_field(shape).expand(4, -1, *shape))
    grid = identity_grid(shape, dtype=torch.float64)
    on_grid = inverse_consistency(swap, swap, grid)
    assert on_grid.max() < 1e-20
    off_grid = inverse_consistency(swap, swap, random_points(4, shape, dtype=torch.float64,
                                                              generator=torch.Generator().manual_seed(1)))
    assert torch.all(off_grid > 1e-3)
    # The swap folds: it is not an innocent map that the grid evaluation happened to accept.
    from cyclereg.core.metrics import count_folds
    assert torch.all(count_folds(swap(grid)) > 0)


def test_inverse_consistency_noise(dim, shape):
    """With noise ε voxels on each map, identity maps give residual ε(n1 + n2) per component."""
    points = random_points(64, shape, dtype=torch.float64)
    eps = 0.5
    g = torch.Generator().manual_seed(3)
    noisy = inverse_consistency(Identity(), Identity(), points, noise=eps, generator=g)
    expected = 2 * eps**2 * sum(1 / (n - 1) ** 2 for n in shape) / dim
    torch.testing.assert_close(noisy.mean(), torch.tensor(expected, dtype=torch.float64), rtol=0.1, atol=0)
    again = inverse_consistency(Identity(), Identity(), points, noise=eps, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)
    t = translation(shape, [0.7, -1.2, 0.4][:dim], n=64, dtype=torch.float64)
    pair = (DisplacementField(t), DisplacementField(-t))
    assert inverse_consistency(*pair, points).max() < 1e-24
    assert inverse_consistency(*pair, points, noise=eps).min() > 1e-4


# --- gradient inverse consistency (GradICON) ---------------------------------------------------

def _scaling_field(shape, s, dtype=torch.float64):
    """Displacement of ``x -> c + s (x - c)`` (c the domain centre): linear, so exact between nodes."""
    grid = identity_grid(shape, dtype=dtype)
    return ((s - 1) * (grid - 0.5)).expand(2, -1, *shape)


def test_gradicon_is_zero_for_an_exact_inverse_pair(dim, shape):
    points = rand_points(2, dim, low=0.2, high=0.8)
    t = translation(shape, [0.7, -1.2, 0.4][:dim], n=2, dtype=torch.float64)
    assert gradient_inverse_consistency(DisplacementField(t), DisplacementField(-t), points).max() < 1e-20
    # A scaling and its inverse, at points whose images stay inside the domain.
    s = 1.25
    ab, ba = DisplacementField(_scaling_field(shape, s)), DisplacementField(_scaling_field(shape, 1 / s))
    assert gradient_inverse_consistency(ab, ba, points).max() < 1e-16
    assert gradient_inverse_consistency(ba, ab, points).max() < 1e-16
    assert gradient_inverse_consistency(Identity(), Identity(), points).max() == 0


def test_gradicon_ignores_a_translation_mismatch_but_icon_does_not(dim, shape):
    points = rand_points(1, dim)
    a = DisplacementField(translation(shape, [1.0, 0.5, -0.5][:dim], dtype=torch.float64))
    b = DisplacementField(translation(shape, [0.5, 0.5, 0.5][:dim], dtype=torch.float64))
    assert gradient_inverse_consistency(a, b, points).item() < 1e-20
    assert inverse_consistency(a, b, points).item() > 1e-3


def test_gradicon_value_for_a_scaling(dim, shape):
    """Φ_AB ∘ Φ_BA = scaling by s: Jacobian minus identity is (s - 1) I, Frobenius² d (s - 1)², and the
    authors' term (the mean over components of each axis' derivative, summed over axes) (s - 1)²."""
    points = rand_points(2, dim, low=0.2, high=0.8)
    s = 1.1
    loss = gradient_inverse_consistency(DisplacementField(_scaling_field(shape, s)), Identity(), points)
    torch.testing.assert_close(loss, torch.full((2,), (s - 1) ** 2, dtype=torch.float64))


def test_gradicon_positive_for_a_non_affine_mismatch(dim, shape):
    points = random_points(2, shape, dtype=torch.float64)
    phi = DisplacementField(smooth_field(shape, n=2, seed=5, voxels=1.5, dtype=torch.float64))
    t = translation(shape, [0.3] * dim, n=2, dtype=torch.float64)
    assert torch.all(gradient_inverse_consistency(phi, DisplacementField(t), points) > 1e-3)
    assert torch.all(gradient_inverse_consistency(phi, DisplacementField(-phi.field), points) > 1e-4)


# --- diffusion --------------------------------------------------------------------------------

def test_diffusion_is_zero_for_a_translation_and_positive_otherwise(dim, shape):
    assert torch.all(diffusion(translation(shape, [0.7, -1.2, 0.4][:dim], n=2, dtype=torch.float64)) == 0)
    assert torch.all(diffusion(smooth_field(shape, n=2, seed=6)) > 1e-3)


def test_diffusion_value_for_a_shear(dim, shape):
    """Displacement along component 0 of α voxels per voxel along the last axis: one of the d × d
    Jacobian entries is α, so the mean over components and axes is α² / d²."""
    alpha = 0.3
    field = torch.zeros(1, dim, *shape, dtype=torch.float64)
    last = torch.arange(shape[-1], dtype=torch.float64)
    field[0, 0] = alpha * last / (shape[0] - 1)  # voxels along axis 0 = α * index along the last axis
    torch.testing.assert_close(diffusion(field), torch.tensor([alpha**2 / dim**2], dtype=torch.float64))


# --- gradients --------------------------------------------------------------------------------

GC_SHAPES = [(5, 4), (4, 3, 4)]


@pytest.mark.parametrize("gshape", GC_SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("fn", [mse, ncc, lambda a, b: lncc(a, b, sigma=1.0)], ids=["mse", "ncc", "lncc"])
def test_similarity_gradcheck(fn, gshape):
    a = torch.randn(2, 1, *gshape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, *gshape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("gshape", GC_SHAPES, ids=["2d", "3d"])
def test_consistency_losses_gradcheck(gshape):
    d = len(gshape)
    fa = (0.2 * torch.randn(2, d, *gshape, dtype=torch.float64)).requires_grad_(True)
    fb = (0.2 * torch.randn(2, d, *gshape, dtype=torch.float64)).requires_grad_(True)
    points = random_points(2, gshape, dtype=torch.float64).requires_grad_(True)

    def icon(a, b, p):
        return inverse_consistency(DisplacementField(a), DisplacementField(b), p)

    def gradicon(a, b):
        return gradient_inverse_consistency(DisplacementField(a), DisplacementField(b), points.detach(), delta=0.2)

    assert torch.autograd.gradcheck(icon, (fa, fb, points), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(gradicon, (fa, fb), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("gshape", GC_SHAPES, ids=["2d", "3d"])
def test_diffusion_gradcheck(gshape):
    field = torch.randn(2, len(gshape), *gshape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(diffusion, (field,), eps=1e-6, atol=1e-6)


def test_lncc_is_lowest_for_identical_images_with_a_flat_background():
    from cyclereg.data.datasets import triangles_and_circles

    a = triangles_and_circles(4, size=32)
    b = a.roll(3, dims=-1)
    assert bool((lncc(a, a) < lncc(b, a)).all())


@pytest.mark.parametrize("shape", [(2, 3, 11, 14), (1, 2, 9, 7, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("window", [3, 9])
def test_box_sum_equals_the_sum_over_the_zero_padded_cubic_window(shape, window):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(window), dtype=torch.float64)
    d, r = len(shape) - 2, window // 2
    windows = F.pad(x, [r] * (2 * d))
    for axis in range(d):
        windows = windows.unfold(2 + axis, window, 1)
    expected = windows.flatten(-d).sum(-1)
    torch.testing.assert_close(box_sum(x, window), expected)


def test_lncc_box_against_one_fixed_image_is_lncc_box_for_every_warped_image(dim, shape):
    """The fixed image's sums taken once (field refinement) give lncc_box's value for each new warped image."""
    fixed, first, second = smooth_image(shape, 2, seed=1), smooth_image(shape, 2, seed=2), smooth_image(shape, 2, seed=3)
    against = lncc_box_to(fixed, 5)
    for warped in (first, second):
        torch.testing.assert_close(against(warped), lncc_box(warped, fixed, 5))
