"""Configuration files, validation and --set overrides (cyclereg.core.config)."""

from pathlib import Path

import pytest

from cyclereg.core.config import Config, apply_overrides, config_from_dict, load_config
from cyclereg.core.errors import UsageError

from conftest import tiny_config_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_without_reading_data(path, monkeypatch, tmp_path):
    # Loading must not touch the data: run from an empty folder where relative roots do not exist.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.dataset in ("triangles", "mnist", "folder")
    assert cfg.model.steps and cfg.train.steps >= 1
    if cfg.data.dataset in ("mnist", "folder"):
        assert isinstance(cfg.data.root, str) and cfg.data.root
    assert config_from_dict(cfg.to_dict()) == cfg  # the dictionary form round trips


def test_defaults_are_valid():
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.model.steps[0].network == "unet" and cfg.train.stages == []


@pytest.mark.parametrize("raw,key", [
    ({"model": {"lamda": 1.0}}, "model.lamda"),
    ({"dataa": {}}, "dataa"),
    ({"train": {"stages": [{"fraction": 1.0, "lr": 1}]}}, "train.stages[0].lr"),
    ({"model": {"steps": [{"network": "unet"}, {"netwrk": "unet"}]}}, "model.steps[1].netwrk"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(UsageError) as err:
        config_from_dict(raw)
    assert f"config key '{key}' is unknown" in str(err.value)


@pytest.mark.parametrize("raw,key", [
    ({"model": {"lam": "big"}}, "model.lam"),
    ({"model": {"lam": True}}, "model.lam"),
    ({"train": {"steps": 2.5}}, "train.steps"),
    ({"train": {"steps": True}}, "train.steps"),
    ({"data": {"size": "32"}}, "data.size"),
    ({"data": {"root": 5}}, "data.root"),
    ({"model": {"steps": {"network": "unet"}}}, "model.steps"),
    ({"model": {"steps": [{"params": [1, 2]}]}}, "model.steps[0].params"),
    ({"train": {"stages": [{"train": ["a"]}]}}, "train.stages[0].train[0]"),
    ({"model": "icon"}, "model"),
    ({"model": {"lam": float("nan")}}, "model.lam"),
    ({"model": {"lam": -1.0}}, "model.lam"),
    ({"model": {"noise": -0.5}}, "model.noise"),
    ({"model": {"sigma": 0.0}}, "model.sigma"),
    ({"model": {"method": "voxelmorph"}}, "model.method"),
    ({"model": {"method": "cycle"}}, "model.method"),
    ({"model": {"similarity": "mi"}}, "model.similarity"),
    ({"model": {"steps": []}}, "model.steps"),
    ({"model": {"steps": [{"network": "resnet"}]}}, "model.steps[0].network"),
    ({"model": {"steps": [{"downsample": 3}]}}, "model.steps[0].downsample"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"lr": 0.0}}, "train.lr"),
    ({"train": {"checkpoint_every": 0}}, "train.checkpoint_every"),
    ({"train": {"stages": [{"fraction": 0.5}, {"fraction": 0.4}]}}, "train.stages"),
    ({"train": {"stages": [{"fraction": 1.0, "train": [1]}]}}, "train.stages[0].train"),
    ({"model": {"steps": [{}, {}]}, "train": {"stages": [{"train": [0, 1], "patch": [8, 8]}]}}, "train.stages[0].train"),
    ({"model": {"steps": [{}, {}, {}]}, "train": {"stages": [{"train": [1], "patch": [8, 8]}]}}, "train.stages[0].train"),
    ({"model": {"steps": [{}, {}]}, "train": {"stages": [{"train": [1], "patch": [2, 8]}]}}, "train.stages[0].patch"),
    ({"data": {"dataset": "cifar"}}, "data.dataset"),
    ({"data": {"digit": 10}}, "data.digit"),
    ({"data": {"holdout": 1.0}}, "data.holdout"),
    ({"data": {"size": 4}}, "data.size"),
    ({"data": {"n_train": 1}}, "data.n_train"),
    ({"data": {"dataset": "mnist"}}, "data.root"),
    ({"data": {"augment": -0.1}}, "data.augment"),
    ({"model": {"window": 4}}, "model.window"),
    ({"model": {"alpha": -1.0}}, "model.alpha"),
    ({"model": {"beta": -1.0}}, "model.beta"),
    ({"model": {"shared": "yes"}}, "model.shared"),
    ({"train": {"betas": [0.9]}}, "train.betas"),
    ({"train": {"betas": [0.9, 1.0]}}, "train.betas"),
])
def test_wrong_values_are_named(raw, key):
    with pytest.raises(UsageError) as err:
        config_from_dict(raw)
    assert f"config key '{key}'" in str(err.value)


def test_integers_are_accepted_for_numbers():
    cfg = config_from_dict({"model": {"lam": 512}, "train": {"lr": 1}})
    assert cfg.model.lam == 512.0 and isinstance(cfg.model.lam, float)
    assert isinstance(cfg.train.lr, float)


def test_apply_overrides_numbers_strings_and_nested_keys():
    raw = tiny_config_dict()
    apply_overrides(raw, ["model.lam=512", "train.lr=2e-3", "data.root=/data/mnist", 'model.similarity="ncc"',
                          "model.method=gradicon", "data.dataset=mnist", "train.batch_size=7",
                          "model.steps=[{network = 'convonly', downsample = 2}]", "data.extra.deep=1"])
    assert raw["model"]["lam"] == 512 and raw["train"]["lr"] == 2e-3 and raw["train"]["batch_size"] == 7
    assert raw["data"]["root"] == "/data/mnist" and raw["data"]["dataset"] == "mnist"
    assert raw["model"]["similarity"] == "ncc" and raw["model"]["method"] == "gradicon"
    assert raw["model"]["steps"] == [{"network": "convonly", "downsample": 2}]
    assert raw["data"]["extra"] == {"deep": 1}  # created; validation rejects it later
    with pytest.raises(UsageError, match="'data.extra' is unknown"):
        config_from_dict(raw)


def test_apply_overrides_errors():
    with pytest.raises(UsageError, match="expected key=value"):
        apply_overrides({}, ["model.lam"])
    with pytest.raises(UsageError, match="expected key=value"):
        apply_overrides({}, ["=3"])
    with pytest.raises(UsageError, match="'lam' is not a table"):
        apply_overrides({"model": {"lam": 1.0}}, ["model.lam.x=1"])


def test_load_config_applies_overrides_then_validates(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\ndataset = "triangles"\nsize = 16\n\n[model]\nlam = 2.0\n\n[[model.steps]]\nnetwork = "mlp"\n')
    cfg = load_config(path, ["model.lam=8", "train.steps=3", "model.method=diffusion"])
    assert cfg.model.lam == 8.0 and cfg.train.steps == 3 and cfg.model.method == "diffusion"
    assert cfg.model.steps[0].network == "mlp" and cfg.data.size == 16
    with pytest.raises(UsageError, match="'model.lam'"):
        load_config(path, ["model.lam=-1"])
    with pytest.raises(UsageError, match="'model.lamda' is unknown"):
        load_config(path, ["model.lamda=1"])


def test_load_config_file_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nlam = 1\n")
    with pytest.raises(UsageError, match="not valid TOML") as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_the_names_a_config_may_use_are_those_of_the_registries():
    """core.config validates names without importing the layers that implement them; they must agree."""
    from cyclereg.core import config
    from cyclereg.losses import SIMILARITIES
    from cyclereg.models.methods import METHODS
    from cyclereg.models.networks import NETWORKS

    assert set(config.METHOD_NAMES) == set(METHODS)
    assert set(config.SIMILARITY_NAMES) == set(SIMILARITIES)
    assert set(config.NETWORK_NAMES) == set(NETWORKS)
    assert set(config.DEFAULT_LAM) == set(METHODS)
