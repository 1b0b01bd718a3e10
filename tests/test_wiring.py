"""Method-level wiring: each method's loss on stand-in networks whose maps are known, against closed-form
values, so that a term evaluated at the wrong points, on the wrong direction, through the wrong network,
on swapped arguments or with a weight left out makes a test fail.

Stand-ins return constant or linear displacement fields, which linear interpolation represents exactly,
and shift images by whole voxels, so every expected value is exact up to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cyclereg.core.config import config_from_dict
from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.losses import lncc_box, mse
from cyclereg.models.methods import LossSettings, loss_terms, settings_from_config
from cyclereg.models.registration import CycleMorph
from cyclereg.core.transforms import DisplacementField, warp


def _translation(shape, voxels, n=1) -> torch.Tensor:
    """A constant field ``(n, d, *shape)`` of ``voxels`` (one number per axis), in domain units."""
    d = len(shape)
    v = torch.tensor(voxels, dtype=torch.float64).view(1, d, *([1] * d))
    return (v / voxel_scale(shape, dtype=torch.float64)).expand(n, d, *shape).clone()


def _bumps(shape, centres) -> torch.Tensor:
    """``(n, 1, *shape)`` images of a compact bump (zero 3 voxels from its centre) at each centre (voxels)."""
    grid = identity_grid(shape, dtype=torch.float64) * voxel_scale(shape, dtype=torch.float64)
    out = []
    for c in centres:
        r = (grid - torch.tensor(c, dtype=torch.float64).view(1, -1, *([1] * len(shape)))).pow(2).sum(1, keepdim=True).sqrt()
        out.append(torch.relu(1 - r / 3).pow(2))
    return torch.cat(out)


def _centroid(images: torch.Tensor) -> torch.Tensor:
    """Intensity centroid ``(n, d)`` in domain units."""
    d = images.ndim - 2
    grid = identity_grid(images.shape[2:], dtype=images.dtype)
    weights = images / images.flatten(1).sum(1).view(-1, *([1] * (d + 1)))
    return (grid * weights).flatten(2).sum(2)


class Fixed(nn.Module):
    """A stand-in network: ``Φ_AB`` (field ``ab``) when called on the batch's moving images, ``Φ_BA``
    (field ``ba``) on its fixed images, and both stacked when a symmetric method calls it on both."""

    def __init__(self, a, b, ab, ba):
        super().__init__()
        self.a, self.b, self.ab, self.ba = a, b, ab, ba

    def forward(self, moving, fixed):
        if torch.equal(moving, self.a):
            return DisplacementField(self.ab)
        if torch.equal(moving, self.b):
            return DisplacementField(self.ba)
        assert torch.equal(moving, torch.cat([self.a, self.b])), "called on images it does not know"
        return DisplacementField(torch.cat([self.ab, self.ba]))


class Constant(nn.Module):
    """A stand-in network that predicts the same field whatever it is given."""

    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, moving, fixed):
        return DisplacementField(self.field.expand(moving.shape[0], *self.field.shape[1:]))


class Oracle(nn.Module):
    """A stand-in network that registers by translation: the shift that takes the moving image's centroid
    onto the fixed image's (exact for whole-voxel shifts of a bump away from the border)."""

    def forward(self, moving, fixed):
        shift = _centroid(moving) - _centroid(fixed)
        d = moving.ndim - 2
        return DisplacementField(shift.view(*shift.shape, *([1] * d)).expand(-1, -1, *moving.shape[2:]).clone())


@pytest.fixture
def pair(shape):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(2, 1, *shape, generator=g, dtype=torch.float64),
            torch.rand(2, 1, *shape, generator=g, dtype=torch.float64))


# --- ICON, GradICON, diffusion ----------------------------------------------------------------------

def test_icon_term_is_the_sum_of_both_compositions_for_translations(pair, shape):
    """For translations t, s: Φ_AB∘Φ_BA − Id = Φ_BA∘Φ_AB − Id = t + s everywhere, so the term is
    2 · mean over components of (t + s)², in domain units. One composition alone gives half."""
    a, b = pair
    d = len(shape)
    ab, ba = _translation(shape, [1.0, -0.5, 0.25][:d], 2), _translation(shape, [-0.25, 0.0, 0.5][:d], 2)
    _, terms = loss_terms(Fixed(a, b, ab, ba), a, b, LossSettings("icon", "mse", 1.0))
    expected = 2 * (ab + ba)[0, :, (0,) * d].pow(2).mean()
    torch.testing.assert_close(terms["icon"], expected)


def test_icon_term_is_evaluated_off_the_grid(pair, shape):
    """A field alternating +c / −c from one grid row to the next is ±c at every node but smaller in
    between: at the nodes the term would be 2·c²/d exactly; at points jittered by a voxel it is about a
    third of that."""
    a, b = pair
    d, c = len(shape), 0.05
    rows = torch.arange(shape[0], dtype=torch.float64).view(-1, *([1] * (d - 1)))
    ab = torch.zeros(2, d, *shape, dtype=torch.float64)
    ab[:, 0] = c * (1 - 2 * (rows % 2))
    ba = torch.zeros_like(ab)
    values = torch.stack([loss_terms(Fixed(a, b, ab, ba), a, b, LossSettings("icon", "mse", 1.0))[1]["icon"]
                          for _ in range(20)])
    on_grid = 2 * c * c / d
    assert 0.15 * on_grid < float(values.mean()) < 0.6 * on_grid


def test_gradicon_term_for_a_scaling_is_the_authors_closed_form(pair, shape):
    """Φ_AB = a scaling by s about the centre, Φ_BA = Id: the Jacobian of Φ_AB∘Φ_BA − Id is (s − 1) I,
    and the authors' term (per axis, the mean over components of its squared derivative; summed over
    axes) is (s − 1)²."""
    a, b = pair
    s = 1.05
    grid = identity_grid(shape, dtype=torch.float64)
    ab = ((s - 1) * (grid - 0.5)).expand(2, *grid.shape[1:]).clone()
    ba = torch.zeros_like(ab)
    settings = LossSettings("gradicon", "mse", 1.0)
    values = torch.stack([loss_terms(Fixed(a, b, ab, ba), a, b, settings)[1]["gradicon"] for _ in range(5)])
    # points jittered past the border see the clamped field; keep the test to its interior value
    assert abs(float(values.max()) - (s - 1) ** 2) < 0.35 * (s - 1) ** 2
    assert float(values.min()) > 0.5 * (s - 1) ** 2


@pytest.mark.parametrize("method", ["icon", "gradicon"])
def test_symmetric_similarity_sums_both_directions(pair, method):
    """With identity maps the similarity is mse(A, B) + mse(B, A), per pair."""
    a, b = pair
    zero = torch.zeros(2, a.ndim - 2, *a.shape[2:], dtype=torch.float64)
    _, terms = loss_terms(Fixed(a, b, zero, zero), a, b, LossSettings(method, "mse", 1.0))
    torch.testing.assert_close(terms["sim"], 2 * mse(a, b).mean())


@pytest.mark.parametrize("method", ["icon", "gradicon", "diffusion", "cyclemorph"])
def test_total_weighs_the_regulariser_by_lambda(pair, shape, method):
    a, b = pair
    d = len(shape)
    grid = identity_grid(shape, dtype=torch.float64)
    bend = 0.02 * torch.sin(6 * grid).expand(2, d, *shape)  # neither a translation nor inverse consistent
    if method == "cyclemorph":
        model = CycleMorph(Constant(bend), Constant(0.5 * bend))
    else:
        model = Fixed(a, b, bend, bend)
    name = {"cyclemorph": "smooth"}.get(method, method)
    totals = {}
    for lam in (1.0, 7.0):
        total, terms = loss_terms(model, a, b, LossSettings(method, "mse", lam, alpha=0.3, beta=0.2))
        rest = total - lam * terms[name]
        totals[lam] = total
        if method == "cyclemorph":
            torch.testing.assert_close(rest, terms["sim"] + 0.3 * terms["cycle"] + 0.2 * terms["identity"])
        else:
            torch.testing.assert_close(rest, terms["sim"])
        assert float(terms[name]) > 0
    assert float(totals[7.0] - totals[1.0]) > 0


# --- CycleMorph ---------------------------------------------------------------------------------------

@pytest.fixture
def bumps(dim):
    shape = (16, 15) if dim == 2 else (14, 13, 12)
    centre = [s // 2 for s in shape]
    moved = [c + (2 if k == 0 else -1) for k, c in enumerate(centre)]
    return _bumps(shape, [centre]), _bumps(shape, [moved])


def test_cyclemorph_cycle_goes_back_through_g_ba(bumps):
    """G_AB shifts by t and G_BA by −t whatever they see: going there with G_AB and back with G_BA
    returns both images exactly (cycle 0); back through G_AB would shift them by 2t."""
    a, b = bumps
    shape = a.shape[2:]
    t = _translation(shape, [1.0, 1.0, -1.0][: len(shape)])
    model = CycleMorph(Constant(t), Constant(-t))
    _, terms = loss_terms(model, a, b, LossSettings("cyclemorph", "mse", 1.0))
    assert float(terms["cycle"]) < 1e-12
    swapped = CycleMorph(Constant(t), Constant(t))  # what a cycle through G_AB twice would see
    assert float(loss_terms(swapped, a, b, LossSettings("cyclemorph", "mse", 1.0))[1]["cycle"]) > 1e-3


def test_cyclemorph_cycle_registers_the_warped_moving_image_to_the_warped_fixed_one(bumps):
    """With networks that register exactly, the cycle G_BA(A∘Φ_AB, B∘Φ_BA) brings A back (cycle 0);
    its arguments swapped, it would push A further away."""
    a, b = bumps
    model = CycleMorph(Oracle(), Oracle())
    _, terms = loss_terms(model, a, b, LossSettings("cyclemorph", "mse", 1.0))
    assert float(terms["sim"]) < 1e-12  # the oracle registers the pair exactly
    assert float(terms["cycle"]) < 1e-12


def test_cyclemorph_identity_loss_registers_each_image_to_itself(bumps):
    """G(B, B) of an exact registration is the identity, so the identity term is the local NCC of each
    image with itself, its lowest value; on (moving, fixed) the oracle would move the image."""
    a, b = bumps
    model = CycleMorph(Oracle(), Oracle())
    _, terms = loss_terms(model, a, b, LossSettings("cyclemorph", "mse", 1.0, window=5))
    expected = (lncc_box(a, a, 5) + lncc_box(b, b, 5)).mean()
    torch.testing.assert_close(terms["identity"], expected)
    moved = lncc_box(warp(b, Oracle()(a, b)), b, 5).mean()
    assert float(moved) > float(lncc_box(b, b, 5).mean()) + 0.05


def test_cyclemorph_terms_use_lambda_r_and_the_configured_window(bumps):
    """``model.window`` reaches the similarity and the identity loss through the config."""
    a, b = bumps
    cfg = config_from_dict({"model": {"method": "cyclemorph", "similarity": "lncc_box", "window": 5, "lam": 3.0}})
    settings = settings_from_config(cfg.model)
    zero = torch.zeros(1, a.ndim - 2, *a.shape[2:], dtype=torch.float64)
    model = CycleMorph(Constant(zero), Constant(zero))
    total, terms = loss_terms(model, a, b, settings)
    torch.testing.assert_close(terms["sim"], (lncc_box(a, b, 5) + lncc_box(b, a, 5)).mean())
    torch.testing.assert_close(terms["identity"], (lncc_box(a, a, 5) + lncc_box(b, b, 5)).mean())
    assert settings.lam == 3.0


def test_cyclemorph_default_lambda_is_the_authors(tmp_path):
    cfg = config_from_dict({"model": {"method": "cyclemorph"}})
    assert cfg.model.lam == 1.0  # CycleMorph's lambda_R
    assert config_from_dict({"model": {"method": "icon"}}).model.lam == 2048.0


# --- training wiring ---------------------------------------------------------------------------------

def test_training_uses_the_configured_adam_betas(tmp_path):
    from cyclereg.training.train import train

    cfg = config_from_dict({
        "data": {"dataset": "triangles", "size": 16, "n_train": 8, "val_pairs": 2},
        "model": {"method": "icon", "lam": 1.0, "steps": [{"network": "unet", "params": {"channels": [4, 8]}}]},
        "train": {"steps": 1, "batch_size": 2, "betas": [0.5, 0.99], "workers": 0, "checkpoint_every": 1},
    })
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert tuple(state["optimizer"]["param_groups"][0]["betas"]) == (0.5, 0.99)
