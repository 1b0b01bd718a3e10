"""Field refinement (:mod:`cyclereg.registration.refine`): the last stage of instance optimisation, on the map."""

from __future__ import annotations

import pytest
import torch

from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.core.errors import UsageError
from cyclereg.losses import lncc_box
from cyclereg.registration.refine import WINDOW, refine_map
from cyclereg.core.transforms import DisplacementField, Identity, sample
from cyclereg.registration.tuning import InstanceOptimisation

from conftest import smooth_image

SHAPES = {2: (28, 24), 3: (18, 16, 14)}


def _shifted_pair(shape, shift_voxels):
    """``fixed`` and ``moving(y) = fixed(y - t)``: the map ``Φ(x) = x + t`` aligns them. The sine
    gives the smooth image finer detail for the local correlation to hold on to."""
    fixed = torch.sin(3 * smooth_image(shape, 1, 5, waves=6))
    x = identity_grid(shape)
    t = torch.tensor(shift_voxels).view(1, -1, *[1] * len(shape)) / voxel_scale(shape)
    return sample(fixed, x - t), fixed, t


def _interior(field, margin=3):
    d = field.ndim - 2
    return field[(slice(None), slice(None)) + (slice(margin, -margin),) * d]


def test_refinement_recovers_a_shift_the_map_missed(dim):
    """From the identity, the refined map finds a shift of about one voxel per axis in the interior,
    and the warped moving image matches the fixed one better than before."""
    shape = SHAPES[dim]
    shift = [1.0, -0.8, 0.6][:dim]
    moving, fixed, t = _shifted_pair(shape, shift)
    refined = refine_map(Identity(), moving, fixed, steps=150, lr=0.1, weight=0.1, downsample=4)
    assert isinstance(refined, DisplacementField) and refined.field.shape == (1, dim, *shape)
    found = _interior(refined.field * voxel_scale(shape)).flatten(2).mean(2)[0]
    torch.testing.assert_close(found, torch.tensor(shift), atol=0.2, rtol=0)
    x = identity_grid(shape)
    before, after = (float(lncc_box(sample(moving, p), fixed, WINDOW)) for p in (x, refined(x)))
    assert after < 0.5 * before


def test_refinement_starts_from_the_map_and_keeps_it_with_zero_steps(dim):
    """The residual starts at zero: no steps return the map itself on the fixed grid; with steps,
    the refined map is the given map plus a residual, not a fresh start from the identity."""
    shape = SHAPES[dim]
    moving, fixed, t = _shifted_pair(shape, [1.0, -0.8, 0.6][:dim])
    given = DisplacementField(t.expand(1, dim, *shape).clone())
    same = refine_map(given, moving, fixed, steps=0)
    torch.testing.assert_close(same.field, given.field)
    refined = refine_map(given, moving, fixed, steps=20, lr=0.05)
    change = _interior((refined.field - given.field) * voxel_scale(shape))
    assert change.abs().max() < 0.5  # the given map is already right: little left to change
    from_identity = refine_map(Identity(), moving, fixed, steps=20, lr=0.05)
    assert (_interior(from_identity.field - refined.field) * voxel_scale(shape)).abs().mean() > 0.2


def test_the_diffusion_weight_holds_the_residual_back(dim):
    """A large weight on the residual's ``‖∇R‖²`` leaves it smaller and smoother than no weight."""
    shape = SHAPES[dim]
    moving, fixed = smooth_image(shape, 1, 1, waves=6), smooth_image(shape, 1, 2, waves=6)

    def residual(weight):
        field = refine_map(Identity(), moving, fixed, steps=30, lr=0.1, weight=weight, downsample=1).field
        vox = field * voxel_scale(shape)
        return sum(torch.diff(vox, dim=2 + k).pow(2).mean() for k in range(dim))

    assert residual(1000.0) < 0.1 * residual(0.0)


@pytest.mark.parametrize("field, message", [({"field_steps": -1}, "--io-field-steps"), ({"field_lr": 0.0}, "--io-field-lr"),
                                            ({"field_weight": -1.0}, "--io-field-weight"),
                                            ({"field_downsample": 0}, "--io-field-downsample")])
def test_bad_refinement_settings_name_the_option(field, message):
    with pytest.raises(UsageError, match=message):
        InstanceOptimisation(**field)
