"""Direct optimisation of one pair's fields, and instance optimisation of a trained network."""

import pytest
import torch

from cyclereg.core.coords import identity_grid
from cyclereg.data.datasets import triangles_and_circles
from cyclereg.core.errors import UsageError
from cyclereg.losses import mse
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.models.registration import Passes, RegistrationModel, build_model, coarse_view, downsample
from cyclereg.core.metrics import count_folds
from cyclereg.registration.optimize import optimize_pair
from cyclereg.registration.instance import instance_optimisation
from cyclereg.core.transforms import map_on_grid, warp
from cyclereg.registration.tuning import InstanceOptimisation

from conftest import random_two_step_model, smooth_image


def _pair(size=24):
    images = triangles_and_circles(2, size, seed=3)
    return images[:1], images[1:]


def test_direct_optimisation_reduces_the_loss(dim):
    if dim == 2:
        moving, fixed = _pair()
    else:
        moving, fixed = smooth_image((8, 7, 6), 1, 1), smooth_image((8, 7, 6), 1, 2)
    _, _, history = optimize_pair(moving, fixed, LossSettings("icon", "mse", lam=64.0), steps=60)
    assert history[-1] < 0.7 * history[0]


def test_direct_optimisation_noise_changes_the_result():
    moving, fixed = _pair()
    plain = LossSettings("icon", "mse", lam=2048.0, noise=0.0)
    noisy = LossSettings("icon", "mse", lam=2048.0, noise=0.125)
    phi_a, _, _ = optimize_pair(moving, fixed, plain, steps=80)
    phi_b, _, _ = optimize_pair(moving, fixed, noisy, steps=80)
    assert (phi_a.field - phi_b.field).abs().max() > 1e-4


def test_direct_optimisation_works_for_every_method():
    moving, fixed = _pair(16)
    for method, lam in (("gradicon", 1.0), ("diffusion", 0.1), ("icon", 64.0)):
        phi_ab, _, history = optimize_pair(moving, fixed, LossSettings(method, "mse", lam=lam), steps=30)
        assert history[-1] < history[0], method
        assert count_folds(map_on_grid(phi_ab, (16, 16), moving)).item() >= 0


def test_instance_optimisation_improves_the_pair_and_restores_the_weights():
    moving, fixed = _pair(24)
    model = build_model([{"network": "unet", "params": {"channels": [8, 16, 32]}}], 2, (24, 24)).eval()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LossSettings("icon", "mse", lam=64.0)
    with torch.no_grad():
        before = float(mse(warp(moving, model(moving, fixed)), fixed))
    with instance_optimisation(model, moving, fixed, settings, InstanceOptimisation(40, 2e-3)) as tuned, torch.no_grad():
        during = float(mse(warp(moving, tuned(moving, fixed)), fixed))
    with torch.no_grad():
        after = float(mse(warp(moving, model(moving, fixed)), fixed))
    assert during < 0.9 * before
    assert after == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stored.items())
    assert not model.training


def test_instance_optimisation_of_a_model_run_in_passes_tunes_one_pass():
    """Fine-tuning a model run in several passes trains it as it was trained, one pass at a time:
    the tuned weights are those of fine-tuning the model alone."""
    moving, fixed = _pair(16)
    model = build_model([{"network": "unet", "params": {"channels": [8, 16]}}], 2, (16, 16)).eval()
    settings = LossSettings("icon", "mse", lam=64.0)
    tuned_weights = []
    for runner in (model, Passes(model, 3)):
        torch.manual_seed(0)  # the ICON loss draws random points
        with instance_optimisation(runner, moving, fixed, settings, InstanceOptimisation(5, 2e-3)) as tuned:
            tuned_weights.append({k: v.clone() for k, v in model.state_dict().items()})
            assert tuned is runner
    assert all(torch.equal(v, tuned_weights[1][k]) for k, v in tuned_weights[0].items())
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in tuned_weights[0].items())


def test_coarse_view_is_the_downsampled_steps_on_the_downsampled_pair(dim):
    """The view shares the networks of the leading downsampled steps and, on the pair downsampled
    as they downsample it, gives the same map as those steps on the whole pair."""
    shape = (17, 15, 13)[:dim]
    model = random_two_step_model(dim, shape)
    moving, fixed = smooth_image(shape, 1, 1), smooth_image(shape, 1, 2)
    view = coarse_view(model, 2)
    assert [s.factor for s in view.steps] == [1] and view.steps[0].network is model.steps[0].network
    points = identity_grid(shape)
    with torch.no_grad():
        expected = model.steps[0](moving, fixed)(points)
        got = view(downsample(moving, 2), downsample(fixed, 2))(points)
        assert (expected - points).abs().max() > 1e-3  # not the identity
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    three = build_model([{"network": "unet", "downsample": f, "params": {"channels": [4]}} for f in (4, 2, 1)], dim, shape)
    assert [s.factor for s in coarse_view(three, 2).steps] == [2, 1]
    assert [s.factor for s in coarse_view(three, 4).steps] == [1]
    with pytest.raises(ValueError, match="not a multiple of 2"):
        coarse_view(RegistrationModel(three.steps[2:]), 2)


def test_instance_optimisation_downsampled_tunes_only_the_coarse_steps():
    """``downsample = 2`` tunes the downsampled step on the downsampled pair and leaves the full-
    resolution step as trained; its loss there falls, and every weight is restored afterwards."""
    moving, fixed = _pair(24)
    model = random_two_step_model(2, (24, 24))
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LossSettings("icon", "mse", lam=64.0)
    coarse = coarse_view(model, 2)
    small = downsample(moving, 2), downsample(fixed, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        before = float(loss_terms(coarse, *small, settings)[0])
    with instance_optimisation(model, moving, fixed, settings, InstanceOptimisation(30, 2e-3, downsample=2)) as tuned:
        torch.manual_seed(0)
        with torch.no_grad():
            during = float(loss_terms(coarse, *small, settings)[0])
        changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, stored[k])}
    assert during < 0.9 * before
    assert changed and all(k.startswith("steps.0.") for k in changed)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stored.items())
    with pytest.raises(UsageError, match="--io-downsample 2"):
        fine_first = RegistrationModel(model.steps[1:])
        with instance_optimisation(fine_first, moving, fixed, settings, InstanceOptimisation(3, 2e-3, downsample=2)):
            pass
    with pytest.raises(UsageError, match="--io-steps"):
        InstanceOptimisation(-1)


def test_instance_optimisation_restores_weights_after_an_error():
    moving, fixed = _pair(16)
    model = build_model([{"network": "unet", "params": {"channels": [8, 16]}}], 2, (16, 16)).eval()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with instance_optimisation(model, moving, fixed, LossSettings("icon", "mse", lam=1.0), InstanceOptimisation(3, 0.1)):
            raise RuntimeError("interrupted")
    except RuntimeError:
        pass
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stored.items())
    # and the loss of a restored model is that of the original
    total, _ = loss_terms(model, moving, fixed, LossSettings("icon", "mse", lam=1.0))
    assert torch.isfinite(total)


def test_direct_optimisation_steps_are_in_voxels():
    """Adam's first step moves each field value by ``lr``: in voxels, whatever the grid size."""
    for size in (16, 40):
        moving, fixed = _pair(size)
        phi_ab, _, _ = optimize_pair(moving, fixed, LossSettings("icon", "mse", lam=1.0), steps=1, lr=0.5)
        in_voxels = phi_ab.field * torch.tensor([size - 1.0, size - 1.0]).view(1, 2, 1, 1)
        assert abs(float(in_voxels.abs().max()) - 0.5) < 1e-3, size


def test_optimize_pair_leaves_the_global_generator_as_it_was():
    moving, fixed = _pair(16)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    optimize_pair(moving, fixed, LossSettings("icon", "mse", lam=1.0), steps=3, generator_seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    a = optimize_pair(moving, fixed, LossSettings("icon", "mse", lam=1.0), steps=3, generator_seed=5)[0].field
    b = optimize_pair(moving, fixed, LossSettings("icon", "mse", lam=1.0), steps=3, generator_seed=5)[0].field
    torch.testing.assert_close(a, b)  # its own points are still seeded


def test_instance_optimisation_uses_the_lambda_of_the_last_training_stage(monkeypatch):
    from cyclereg.core.config import config_from_dict
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.models.modelfile import ModelInfo, build_from_info
    from cyclereg.registration import instance
    from cyclereg.registration.tuning import InstanceOptimisation

    from conftest import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict(model__lam=64.0, train__stages=[{"fraction": 0.5, "lam": 8.0},
                                                                             {"fraction": 0.5, "lam": 512.0}]))
    assert cfg.final_lam() == 512.0 and cfg.stage_lams() == [8.0, 512.0]
    info = ModelInfo(cfg, (16, 16), Preprocessing(range=(-1.0, 1.0)))
    seen = []
    real = instance.instance_optimisation
    monkeypatch.setattr(instance, "instance_optimisation", lambda m, a, b, settings, t: seen.append(settings.lam) or real(m, a, b, settings, t))
    image = torch.rand(1, 1, 16, 16)
    instance.tuned_maps(build_from_info(info).eval(), info, image, image.flip(-1), InstanceOptimisation(1, 1e-3))
    assert seen == [512.0]
