"""Models, steps and training losses (cyclereg.models.methods), and a short training run."""

import pytest
import torch
from torch import nn

from cyclereg.core.config import config_from_dict
from cyclereg.data.datasets import dataset_images, fixed_pairs
from cyclereg.evaluation.scores import score_pairs, summarise
from cyclereg.core.coords import voxel_scale
from cyclereg.losses import inverse_consistency, random_points
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.models.registration import Passes, RegistrationModel, Step, build_model, downsample
from cyclereg.models.modelfile import build_from_info, load_model
from cyclereg.training.train import train
from cyclereg.core.transforms import Composed, DisplacementField, warp

from conftest import smooth_image

UNET = {"network": "unet", "params": {"channels": [4, 8]}}


def _perturb_outputs(model, scale=0.01, seed=0):
    """Give every step's zero output layer small random weights, so the model is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for step in model.steps:
            for p in step.network.out.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method,reg", [("icon", "icon"), ("gradicon", "gradicon"), ("diffusion", "diffusion")])
@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_loss_terms_are_finite_and_give_gradients(method, reg, similarity, dim):
    shape = (12, 10) if dim == 2 else (8, 8, 6)
    model = build_model([UNET], dim, shape)
    _perturb_outputs(model)
    moving, fixed = smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)
    settings = LossSettings(method=method, similarity=similarity, lam=3.0, sigma=1.5)
    total, terms = loss_terms(model, moving, fixed, settings)
    assert set(terms) == {"sim", reg}
    assert total.ndim == 0 and torch.isfinite(total)
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    assert terms["sim"] > 0 and terms[reg] > 0
    torch.testing.assert_close(total, terms["sim"] + 3.0 * terms[reg])
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_loss_terms_of_an_identity_model():
    model = build_model([UNET], 2, (12, 10))
    moving, fixed = smooth_image((12, 10), n=3, seed=1), smooth_image((12, 10), n=3, seed=2)
    for method in ("icon", "gradicon", "diffusion"):
        _, terms = loss_terms(model, moving, fixed, LossSettings(method=method))
        assert float(list(terms.values())[1].detach()) == 0.0  # the identity is perfectly regular
    _, terms = loss_terms(model, moving, fixed, LossSettings(method="diffusion"))
    from cyclereg.losses import mse
    torch.testing.assert_close(terms["sim"], mse(moving, fixed).mean())  # one direction
    _, terms = loss_terms(model, moving, fixed, LossSettings(method="icon"))
    torch.testing.assert_close(terms["sim"], 2 * mse(moving, fixed).mean())  # both directions


class _MeanShift(nn.Module):
    """A stand-in network: translates by the difference of the two images' means (scaled), so that
    Φ_BA is exactly the inverse of Φ_AB for every pair, and different pairs get different maps."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(3.0))  # voxels per unit of mean difference

    def forward(self, pair):
        d = pair.ndim - 2
        delta = (pair[:, 0].flatten(1).mean(1) - pair[:, 1].flatten(1).mean(1)) * self.gain
        return delta.view(-1, 1, *([1] * d)).expand(-1, d, *pair.shape[2:])


def test_symmetric_methods_pair_each_map_with_its_reverse():
    """ICON pairs Φ_AB with Φ_BA of the *same* pair: with exact inverse pairs the term is zero,
    which it is not if the batch is paired up wrongly."""
    shape = (10, 9)
    model = RegistrationModel([Step(_MeanShift())])
    moving = torch.stack([torch.full((1, *shape), v) for v in (0.1, 0.5, 0.9)])
    fixed = torch.stack([torch.full((1, *shape), v) for v in (0.8, 0.2, 0.4)])
    moving = moving + 0.1 * smooth_image(shape, n=3, seed=1)
    _, terms = loss_terms(model, moving, fixed, LossSettings(method="icon"))
    assert terms["icon"] < 1e-12
    # Sanity: the maps differ between pairs, so a wrong pairing would not vanish.
    phi_ab, phi_ba = model(moving, fixed), model(fixed, moving)
    points = random_points(3, shape)
    assert inverse_consistency(phi_ab.take(torch.tensor([1, 2, 0])), phi_ba, points).min() > 1e-4
    assert inverse_consistency(phi_ab, phi_ba, points).max() < 1e-12


class _OneVoxel(nn.Module):
    """A stand-in network that answers one voxel along every axis, wherever it looks."""

    def forward(self, pair):
        return torch.ones(pair.shape[0], pair.ndim - 2, *pair.shape[2:])


@pytest.mark.parametrize("factor", [1, 2])
def test_a_step_reads_its_network_in_voxels_of_the_grid_it_sees(factor):
    """The same network gives the same shift in voxels on a small grid, on a larger field of view and
    on a patch: a convolutional network sees shifts in voxels, not in fractions of the image."""
    step = Step(_OneVoxel(), factor)
    for shape in [(9, 13), (17, 25, 33)]:
        images = torch.zeros(1, 1, *shape)
        coarse = [(n - 1) // factor + 1 for n in shape]
        field = step(images, images).field
        assert tuple(field.shape[2:]) == tuple(coarse)
        torch.testing.assert_close(field * voxel_scale(coarse), torch.ones_like(field))


def test_a_two_step_model_composes_its_steps():
    shape = (16, 12)
    model = build_model([UNET, dict(UNET, downsample=2)], 2, shape)
    _perturb_outputs(model, scale=0.02)
    model.eval()
    moving, fixed = smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)
    with torch.no_grad():
        phi = model(moving, fixed)
        first = model.steps[0](moving, fixed)
        second = model.steps[1](warp(moving, first), fixed)
    assert isinstance(phi, Composed)
    assert first.field.shape == (2, 2, 16, 12)
    assert second.field.shape == (2, 2, 8, 6)  # (n - 1) // 2 + 1 voxels per axis
    points = random_points(2, shape)
    expected = first(second(points))  # Φ = Φ_0 ∘ Φ_1: the last step is applied to points first
    torch.testing.assert_close(phi(points), expected)
    assert (second(first(points)) - expected).abs().max() > 1e-5
    assert first.field.abs().max() > 1e-4 and second.field.abs().max() > 1e-4


class _HalfWay(nn.Module):
    """A stand-in model that moves the moving image half way to the fixed one: a constant
    displacement of half the difference of their intensity centroids (domain units)."""

    @staticmethod
    def centroid(images):
        grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in images.shape[2:]], indexing="ij"))
        return (images * grid).flatten(2).sum(2) / images.flatten(2).sum(2)  # (N, d)

    def forward(self, moving, fixed):
        shift = 0.5 * (self.centroid(moving) - self.centroid(fixed))
        return DisplacementField(shift[:, :, None, None].expand(-1, -1, 4, 4).contiguous())


def _blob(shape, centre, width=0.08):
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij"))
    c = torch.tensor(centre).view(-1, 1, 1)
    return torch.exp(-((grid - c) ** 2).sum(0) / (2 * width**2))[None, None]


def test_passes_compose_so_each_pass_corrects_what_the_last_left():
    """A model that registers half of a shift leaves half of it; n passes leave 2^-n of it, and
    one pass is the model itself."""
    shape = (40, 40)
    fixed, moving = _blob(shape, (0.45, 0.5)), _blob(shape, (0.57, 0.42))
    true_shift = _HalfWay.centroid(moving) - _HalfWay.centroid(fixed)
    centre = torch.full((1, 2, 1, 1), 0.5)
    with torch.no_grad():
        assert torch.equal(Passes(_HalfWay(), 1)(moving, fixed)(centre), _HalfWay()(moving, fixed)(centre))
        for n in (1, 2, 3, 4):
            shift = (Passes(_HalfWay(), n)(moving, fixed)(centre) - centre)[:, :, 0, 0]
            torch.testing.assert_close(shift, true_shift * (1 - 0.5**n), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="at least 1 pass"):
        Passes(_HalfWay(), 0)


def test_downsample_keeps_the_domain():
    image = smooth_image((17, 9), dtype=torch.float64)
    small = downsample(image, 2)
    assert small.shape == (1, 1, 9, 5)
    assert downsample(image, 1) is image
    ramp = torch.linspace(0, 1, 17, dtype=torch.float64).view(1, 1, 17, 1).expand(1, 1, 17, 9)
    # A linear ramp stays the same ramp on the coarse grid (away from the replicated border).
    torch.testing.assert_close(downsample(ramp, 2)[0, 0, 2:-2, 0], torch.linspace(0, 1, 9, dtype=torch.float64)[2:-2])


def test_freeze_stops_gradients_and_keeps_batchnorm_in_eval_mode():
    shape = (16, 12)
    model = build_model([UNET, UNET], 2, shape)
    _perturb_outputs(model)
    model.freeze([1])
    model.train()
    frozen_bn = [m for m in model.steps[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    live_bn = [m for m in model.steps[1].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert frozen_bn and live_bn
    assert not any(m.training for m in frozen_bn)
    assert all(m.training for m in live_bn)
    stats = [m.running_mean.clone() for m in frozen_bn]
    moving, fixed = smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)
    total, _ = loss_terms(model, moving, fixed, LossSettings(method="icon", lam=1.0))
    total.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.steps[0].parameters())
    assert all(p.grad is not None for p in model.steps[1].parameters())
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, frozen_bn))
    # eval() then train() again keeps the frozen step in eval mode; unfreezing restores it.
    model.eval().train()
    assert not any(m.training for m in frozen_bn)
    model.freeze([0, 1])
    assert all(m.training for m in frozen_bn)
    assert all(p.requires_grad for p in model.parameters())


def test_short_training_on_triangles_improves_held_out_dice(tmp_path):
    cfg = config_from_dict({
        "data": {"dataset": "triangles", "size": 32, "n_train": 200, "val_pairs": 8},
        "model": {"method": "icon", "similarity": "mse", "lam": 64.0,
                  "steps": [{"network": "unet", "params": {"channels": [16, 32, 64, 128]}}]},
        "train": {"steps": 80, "batch_size": 16, "lr": 2e-3, "log_every": 20, "val_every": 1000,
                  "checkpoint_every": 1000},
    })
    path = train(cfg, tmp_path / "run", device="cpu", progress=False)
    trained, info = load_model(path)
    untrained = build_from_info(info).eval()
    moving, fixed = fixed_pairs(dataset_images(cfg.data, "test", n_test=64), 32, seed=1)
    before = summarise(score_pairs(untrained, moving, fixed), info.shape)
    after = summarise(score_pairs(trained, moving, fixed), info.shape)
    assert before["folds"] == 0 and before["ic_error"] < 1e-6  # the untrained model is the identity
    assert after["dice"] > before["dice"] + 0.2, (before, after)
    assert after["folds_percent"] < 10
