"""Shipped models (``cyclereg.models.shipped``, ``cyclereg models``): a model file in the package's weights
folder with its provenance in its header, used by ``register`` and the Python API when no model is given."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import cyclereg
from cyclereg.cli import main
from cyclereg.core.config import config_from_dict
from cyclereg.core.errors import DataError
from cyclereg.models import shipped
from cyclereg.models.modelfile import ModelInfo, build_from_info, read_header, save_model

from conftest import smooth_image, tiny_config_dict

PROVENANCE = {"commit": "0123abc", "subjects": ["a", "b", "c"], "steps": 40, "heldout": {"dice": 0.5, "n_pairs": 6}}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "FOLDER", tmp_path / "weights")
    return tmp_path / "weights"


@pytest.fixture
def images(tmp_path):
    out = {}
    for name, seed in (("fixed", 1), ("moving", 2)):
        image = sitk.GetImageFromArray(smooth_image((16, 16), 1, seed=seed)[0, 0].numpy().astype(np.float32))
        sitk.WriteImage(image, str(tmp_path / f"{name}.mha"))
        out[name] = tmp_path / f"{name}.mha"
    return out


def _model_file(path):
    info = ModelInfo(config_from_dict(tiny_config_dict()), (16, 16), training={"steps": 40})
    save_model(path, build_from_info(info).eval(), info)
    return path


def test_a_shipped_model_is_listed_and_used_without_model(folder, images, tmp_path, capsys):
    out = shipped.ship(_model_file(tmp_path / "m.safetensors"), shipped.DEFAULT, PROVENANCE)
    assert out == folder / "brain_t1.safetensors"
    header = json.loads(read_header(out)["provenance"])
    assert header["commit"] == "0123abc" and header["heldout"]["dice"] == 0.5 and header["training"] == {"steps": 40}
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["name"] == "brain_t1" and listed["subjects"] == ["a", "b", "c"] and listed["megabytes"] < 20
    assert main(["models"]) == 0
    assert "brain_t1 (default)" in capsys.readouterr().out
    argv = ["register", "--fixed", str(images["fixed"]), "--moving", str(images["moving"]), "--affine", "none",
            "--warped", str(tmp_path / "w.mha"), "--device", "cpu"]
    assert main(argv) == 0
    from_cli = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha")))
    from_api = sitk.GetArrayFromImage(cyclereg.register(images["fixed"], images["moving"], affine="none").warped)
    np.testing.assert_allclose(from_api, from_cli, atol=1e-5)


def test_without_a_shipped_model_models_says_register_runs_without_a_network(folder, capsys):
    assert shipped.default_model() is None
    assert main(["models"]) == 0
    assert "no model ships with this cyclereg: register without --model runs without a network" in capsys.readouterr().out


def test_a_model_over_the_size_limit_is_not_shipped(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "MAX_BYTES", 1000)
    with pytest.raises(DataError, match="under 20 MB"):
        shipped.ship(_model_file(tmp_path / "m.safetensors"), "big", PROVENANCE)
    assert list(folder.iterdir()) == []


def test_a_shipped_model_registers_with_its_own_instance_optimisation_unless_told_otherwise(folder, images, tmp_path, capsys):
    out = shipped.ship(_model_file(tmp_path / "m.safetensors"), shipped.DEFAULT, PROVENANCE, tuning={"field_steps": 20, "field_lr": 0.5})
    assert json.loads(read_header(out)["tuning"]) == {"field_steps": 20, "field_lr": 0.5}
    assert main(["models"]) == 0
    assert "registers with --io-field-steps 20, --io-field-lr 0.5 unless told otherwise" in capsys.readouterr().out

    def warped(*options):
        argv = ["register", "--fixed", str(images["fixed"]), "--moving", str(images["moving"]), "--affine", "none",
                "--warped", str(tmp_path / "w.mha"), "--device", "cpu", *options]
        assert main(argv) == 0
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha")))

    default = warped()
    as_told = sitk.GetArrayFromImage(cyclereg.register(images["fixed"], images["moving"], str(tmp_path / "m.safetensors"),
                                                       affine="none", io_field_steps=20, io_field_lr=0.5).warped)
    np.testing.assert_allclose(default, as_told, atol=1e-5)  # the header's settings, over the plain model's
    plain = warped("--io-field-steps", "0")  # an option given overrides the model's own
    assert np.abs(plain - default).max() > 1e-3
    from_api = cyclereg.register(images["fixed"], images["moving"], affine="none", io_field_steps=0).warped
    np.testing.assert_allclose(sitk.GetArrayFromImage(from_api), plain, atol=1e-5)


def test_a_model_whose_header_names_an_unknown_setting_is_refused(folder, images, tmp_path, capsys):
    shipped.ship(_model_file(tmp_path / "m.safetensors"), shipped.DEFAULT, PROVENANCE, tuning={"field_stepz": 20})
    argv = ["register", "--fixed", str(images["fixed"]), "--moving", str(images["moving"]), "--affine", "none",
            "--warped", str(tmp_path / "w.mha"), "--device", "cpu"]
    assert main(argv) == 1
    assert "header 'tuning' names 'field_stepz'" in capsys.readouterr().err
    assert not (tmp_path / "w.mha").exists()


def test_a_wheel_carries_the_shipped_models(tmp_path):
    """A model in the weights folder goes into a wheel built from the source tree, not only into an editable
    install (pyproject's package data)."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    weights = source / "src" / "cyclereg" / "models" / "weights"
    weights.mkdir(exist_ok=True)
    _model_file(weights / "test_model.safetensors")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("cyclereg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cyclereg/models/weights/test_model.safetensors" in names
    shipped_here = sorted(p.name for p in shipped.FOLDER.glob("*.safetensors"))
    assert all(f"cyclereg/models/weights/{name}" in names for name in shipped_here)
