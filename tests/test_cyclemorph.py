"""CycleMorph: its cycle and identity losses, shared and separate networks, and training."""

import pytest
import torch

from cyclereg.io.preprocess import Preprocessing
from cyclereg.core.config import config_from_dict
from cyclereg.data.datasets import dataset_images, fixed_pairs
from cyclereg.evaluation.scores import score_pairs, summarise
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.models.registration import CycleMorph, build_model
from cyclereg.models.modelfile import ModelInfo, build_from_info, load_model, save_model
from cyclereg.training.train import train

from conftest import smooth_image

SETTINGS = LossSettings("cyclemorph", "lncc_box", lam=1.0, window=5)


def _perturb(model, std=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, std)
    return model


@pytest.mark.parametrize("shared", [False, True], ids=["two-networks", "shared"])
def test_cycle_and_identity_losses_are_zero_for_identity_networks(dim, shape, shared):
    model = build_model([{"network": "voxelmorph"}], dim, shape, method="cyclemorph", shared=shared).eval()
    a, b = smooth_image(shape, 2, seed=1), smooth_image(shape, 2, seed=2)
    _, terms = loss_terms(model, a, b, SETTINGS)  # untrained networks predict the identity
    assert float(terms["cycle"].detach()) < 1e-6
    assert float(terms["identity"].detach()) < 1e-3  # the local NCC's ε, in the images' nearly flat windows
    assert float(terms["smooth"].detach()) < 1e-9
    assert float(terms["sim"].detach()) > 0.01  # the images differ


def test_cycle_and_identity_losses_are_positive_for_non_identity_networks(dim, shape):
    model = _perturb(build_model([{"network": "voxelmorph"}], dim, shape, method="cyclemorph")).eval()
    a, b = smooth_image(shape, 2, seed=1), smooth_image(shape, 2, seed=2)
    _, terms = loss_terms(model, a, b, SETTINGS)
    assert float(terms["cycle"].detach()) > 1e-4
    assert float(terms["identity"].detach()) > 1e-6
    assert float(terms["smooth"].detach()) > 0


def test_identity_loss_is_zero_for_identical_images_even_when_the_map_moves():
    shape = (12, 9)
    model = _perturb(build_model([{"network": "voxelmorph"}], 2, shape, method="cyclemorph")).eval()
    a = smooth_image(shape, 2, seed=1)
    flat_pair = torch.ones_like(a) * 0.3  # registering a constant image to itself: NCC undefined, loss must stay finite
    total, terms = loss_terms(model, a, a, SETTINGS)
    assert torch.isfinite(total)
    total, _ = loss_terms(model, flat_pair, flat_pair, SETTINGS)
    assert torch.isfinite(total)


def test_shared_cyclemorph_has_one_network_and_saves(tmp_path):
    cfg = config_from_dict({"model": {"method": "cyclemorph", "similarity": "lncc_box", "shared": True,
                                      "steps": [{"network": "voxelmorph"}]}})
    info = ModelInfo(cfg, (16, 16), Preprocessing(range=(-1.0, 1.0)))
    shared = build_from_info(info)
    separate = build_model([{"network": "voxelmorph"}], 2, (16, 16), method="cyclemorph")
    assert isinstance(shared, CycleMorph) and shared.reverse is shared.g_ab
    assert sum(p.numel() for p in separate.parameters()) == 2 * sum(p.numel() for p in shared.parameters())
    save_model(tmp_path / "m.safetensors", _perturb(shared), info)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    x, y = smooth_image((16, 16), 1, 1), smooth_image((16, 16), 1, 2)
    with torch.no_grad():
        # loaded models run in channels-last layout on CPU: equal up to the order of sums
        torch.testing.assert_close(loaded(x, y).field, shared.eval()(x, y).field, rtol=1e-5, atol=1e-6)


def test_cyclemorph_trains_and_improves_dice_on_triangles(tmp_path):
    cfg = config_from_dict({
        "data": {"dataset": "triangles", "size": 32, "n_train": 200, "val_pairs": 8},
        "model": {"method": "cyclemorph", "similarity": "lncc_box", "window": 9, "lam": 1.0,
                  "steps": [{"network": "unet", "params": {"channels": [16, 32, 64, 128]}}]},
        "train": {"steps": 60, "batch_size": 16, "lr": 2e-3, "val_every": 1000, "checkpoint_every": 1000},
    })
    trained, info = load_model(train(cfg, tmp_path / "run", device="cpu", progress=False))
    untrained = build_from_info(info).eval()
    moving, fixed = fixed_pairs(dataset_images(cfg.data, "test", n_test=64), 32, seed=1)
    before = summarise(score_pairs(untrained, moving, fixed), info.shape)
    after = summarise(score_pairs(trained, moving, fixed), info.shape)
    assert after["dice"] > before["dice"] + 0.15, (before, after)
