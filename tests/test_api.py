"""The Python API (``cyclereg.load_model``, ``register``, ``evaluate``, ``train``): the same results as
the command line, SimpleITK objects out, and the CLI's errors for bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import cyclereg
from cyclereg.core.errors import UsageError

from conftest import random_two_step_model, smooth_image, tiny_config_dict


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small 2D model with random weights (it moves the image) saved as a model file."""
    from cyclereg.core.config import config_from_dict
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.models.modelfile import ModelInfo, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "model.safetensors"
    steps = [{"network": "unet", "downsample": 2, "params": {"channels": [8, 16]}},
             {"network": "unet", "params": {"channels": [8, 16]}}]  # those of random_two_step_model
    info = ModelInfo(config_from_dict(tiny_config_dict(model__steps=steps)), (20, 18), Preprocessing(range=(0.0, 1.0)))
    save_model(path, random_two_step_model(2, (20, 18), std=0.05), info)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = {}
    for name, seed in (("fixed", 1), ("moving", 2)):
        image = sitk.GetImageFromArray(smooth_image((20, 18), 1, seed=seed)[0, 0].numpy().astype(np.float32))
        image.SetSpacing((0.9, 1.1))
        image.SetOrigin((3.0, -2.0))
        sitk.WriteImage(image, str(folder / f"{name}.mha"))
        out[name] = folder / f"{name}.mha"
    return out


def test_register_gives_the_cli_outputs_as_simpleitk_objects(model_file, images, tmp_path):
    result = cyclereg.register(images["fixed"], images["moving"], model_file)
    code = subprocess.run([sys.executable, "-m", "cyclereg", "register", "--model", str(model_file),
                           "--fixed", str(images["fixed"]), "--moving", str(images["moving"]), "--device", "cpu",
                           "--warped", str(tmp_path / "w.mha"), "--jacobian", str(tmp_path / "j.mha")],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    cli_warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha")))
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), cli_warped, atol=1e-5)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.jacobian),
                               sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "j.mha"))), atol=1e-5)
    assert result.warped.GetSpacing() == (0.9, 1.1) and result.warped.GetOrigin() == (3.0, -2.0)
    assert not np.allclose(cli_warped, sitk.GetArrayFromImage(sitk.ReadImage(str(images["moving"]))))  # it moved


def test_the_transform_warps_with_simpleitk_as_the_registration_does(model_file, images):
    fixed, moving = sitk.ReadImage(str(images["fixed"])), sitk.ReadImage(str(images["moving"]))
    result = cyclereg.register(fixed, moving, cyclereg.load_model(model_file, "cpu"))  # images and a loaded model
    resampled = sitk.Resample(moving, fixed, result.transform, sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(result.warped), atol=1e-4)
    labels = sitk.Cast(moving > 0.0, sitk.sitkUInt8)
    warped_labels = result.warp(labels, nearest=True)
    assert warped_labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(warped_labels))) <= {0, 1}


def test_a_label_map_on_its_own_grid_warps_through_physical_space(model_file, images):
    """Labels of the moving space on a finer, shifted grid than the moving image's land where SimpleITK's
    resampler puts them with the registration's transform (not read as if on the moving grid)."""
    fixed, moving = sitk.ReadImage(str(images["fixed"])), sitk.ReadImage(str(images["moving"]))
    result = cyclereg.register(fixed, moving, model_file)
    own = sitk.Image([31, 29], sitk.sitkUInt8)
    own.SetSpacing((0.55, 0.6))
    own.SetOrigin((3.4, -1.3))
    labels = sitk.Resample(sitk.Cast(moving > -0.1, sitk.sitkUInt8) + sitk.Cast(moving > 0.15, sitk.sitkUInt8),
                           own, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    expected = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, result.transform, sitk.sitkNearestNeighbor, 0))
    warped = sitk.GetArrayFromImage(result.warp(labels, nearest=True))
    assert len(np.unique(expected)) == 3
    assert (warped == expected).mean() > 0.97


def test_write_writes_what_is_named_and_returns_the_summary(model_file, images, tmp_path):
    result = cyclereg.register(images["fixed"], images["moving"], model_file)
    summary = result.write(warped=tmp_path / "w.nii.gz", transform=tmp_path / "t.h5")
    assert {"folds", "jacobian_min", "jacobian_max"} <= set(summary)
    assert (tmp_path / "w.nii.gz").is_file() and (tmp_path / "t.h5").is_file()
    assert not (tmp_path / "j.nii.gz").exists()


def test_register_runs_without_autograd(model_file, images):
    result = cyclereg.register(images["fixed"], images["moving"], model_file)
    grid = result._grid
    assert not (grid.moving_physical.requires_grad or grid.det.requires_grad)

    def fields(phi):
        return fields(phi.outer) + fields(phi.inner) if hasattr(phi, "outer") else [phi.field]

    assert len(fields(result._reg.phi)) == 2 and not any(f.requires_grad for f in fields(result._reg.phi))


def test_bad_options_are_usage_errors(model_file, images):
    with pytest.raises(UsageError, match="unknown option 'io_stepz'"):
        cyclereg.register(images["fixed"], images["moving"], model_file, io_stepz=3)
    with pytest.raises(UsageError, match="passes: expected at least 1"):
        cyclereg.register(images["fixed"], images["moving"], model_file, passes=0)
    with pytest.raises(UsageError, match="--io-steps tunes a network's weights"):  # no model: no network to tune
        cyclereg.register(images["fixed"], images["moving"], "none", io_steps=1)
    with pytest.raises(UsageError, match="--io-lr"):
        cyclereg.register(images["fixed"], images["moving"], model_file, io_steps=1, io_lr=0.0)


def test_evaluate_equals_the_cli_on_a_pairs_csv(model_file, images, tmp_path):
    (tmp_path / "pairs.csv").write_text(f"fixed,moving\n{images['fixed']},{images['moving']}\n")
    ours = cyclereg.evaluate(model_file, tmp_path / "pairs.csv")
    code = subprocess.run([sys.executable, "-m", "cyclereg", "evaluate", "--model", str(model_file), "--device", "cpu",
                           "--pairs-csv", str(tmp_path / "pairs.csv"), "--json", str(tmp_path / "s.json")],
                          capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    theirs = json.loads((tmp_path / "s.json").read_text())
    for key in ("n_pairs", "dice", "folds", "folds_percent", "ic_error"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_train_takes_a_dict_and_overrides(tmp_path):
    path = cyclereg.train(tiny_config_dict(), tmp_path / "run", progress=False, overrides=["train.steps=2"])
    network, info = cyclereg.load_model(path, "cpu")
    assert info.training["steps"] == 2
    assert cyclereg.evaluate(cyclereg.Model(network, info), pairs=2)["n_pairs"] == 2  # on its own dataset
