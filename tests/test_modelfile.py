"""Model files: safetensors with a checked header, never unpickled (cyclereg.models.modelfile)."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cyclereg.io.preprocess import Preprocessing
from cyclereg.core.config import config_from_dict
from cyclereg.core.errors import DataError, UsageError
from cyclereg.models.modelfile import (FORMAT_VERSION, ModelInfo, build_from_info, initialise_from, load_model, save_model,
                               weights_digest)

from conftest import smooth_image, tiny_config_dict


def _trained_like_model(dim=2, shape=(16, 16), network="unet"):
    raw = tiny_config_dict()
    raw["model"]["steps"] = [{"network": network, "params": {"channels": [4, 8]} if network == "unet" else {}},
                             {"network": "convonly", "downsample": 2, "params": {"growth": 2}}]
    info = ModelInfo(config_from_dict(raw), shape, Preprocessing(range=(-1.0, 1.0)))
    model = build_from_info(info)
    torch.manual_seed(1)
    with torch.no_grad():  # every weight random, batch-norm statistics included
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) * 0.1 + (0.5 if t.ndim == 1 else 0))
    return model.eval(), info


def _save(tmp_path, dim=2, shape=(16, 16)):
    model, info = _trained_like_model(dim, shape)
    path = tmp_path / "model.safetensors"
    save_model(path, model, info)
    return path, model, info


def _read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("dim", [2, 3])
def test_round_trip_gives_identical_outputs(tmp_path, dim):
    shape = (16, 12) if dim == 2 else (8, 8, 6)
    path, model, info = _save(tmp_path, dim, shape)
    loaded, info2 = load_model(path)
    assert not loaded.training
    assert info2.shape == shape and info2.dim == dim and info2.intensity == (-1.0, 1.0)
    assert info2.config == info.config
    moving, fixed = smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)
    points = torch.rand(2, dim, *shape)
    with torch.no_grad():
        expected, got = model(moving, fixed)(points), loaded(moving, fixed)(points)
    assert expected.abs().max() > 0 and (expected - points).abs().max() > 1e-4  # not the identity
    # 3D models load in channels-last layout (faster convolutions on CPU): equal up to the order of sums.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_header(tmp_path):
    path, model, info = _save(tmp_path)
    meta, tensors = _read_raw(path)
    assert meta["format"] == "cyclereg-model" and meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["shape"]) == [16, 16] and meta["dim"] == "2"
    assert json.loads(meta["config"])["model"]["lam"] == info.config.model.lam
    assert meta["weights_sha256"] == weights_digest(tensors)


def test_tampered_weights_are_refused(tmp_path):
    path, _, _ = _save(tmp_path)
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    position = 8 + header_len + (len(raw) - 8 - header_len) // 2  # in the data section
    raw[position] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_replaced_weights_with_a_stale_digest_are_refused(tmp_path):
    path, _, _ = _save(tmp_path)
    meta, tensors = _read_raw(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DataError, match="SHA-256"):
        load_model(path)


def _rewrite(path, **changes):
    meta, tensors = _read_raw(path)
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("version", [str(FORMAT_VERSION + 1), "99", "x", "-1"])
def test_newer_or_unknown_format_version_is_refused(tmp_path, version):
    path, _, _ = _save(tmp_path)
    _rewrite(path, format_version=version)
    with pytest.raises(DataError, match="format version") as err:
        load_model(path)
    assert str(path) in str(err.value) and version in str(err.value)


@pytest.mark.parametrize("changes,message", [
    ({"format": "other"}, "not a cyclereg model"),
    ({"format": None}, "not a cyclereg model"),
    ({"config": "{not json"}, "inconsistent header"),
    ({"config": json.dumps({"model": {"lamda": 1}})}, "inconsistent header"),
    ({"shape": None}, "inconsistent header"),
    ({"preprocess": "low"}, "inconsistent header"),
    ({"preprocess": json.dumps({"intensity": "loud"})}, "inconsistent header"),
    ({"preprocess": json.dumps({"spacing": [1.0, -2.0]})}, "inconsistent header"),
    ({"field_units": "furlongs"}, "inconsistent header"),
])
def test_inconsistent_headers_are_refused(tmp_path, changes, message):
    path, _, _ = _save(tmp_path)
    _rewrite(path, **changes)
    with pytest.raises(DataError, match=message):
        load_model(path)


def test_format_version_1_files_still_load(tmp_path):
    """Version 1 stored only the input range ('intensity'); it loads as min-max normalisation to it."""
    path, _, _ = _save(tmp_path)
    _rewrite(path, format_version="1", preprocess=None, intensity=json.dumps([-1.0, 1.0]))
    _, info = load_model(path)
    assert info.preprocess == Preprocessing(range=(-1.0, 1.0))


def test_files_before_format_3_read_network_outputs_in_domain_units(tmp_path):
    """Format 3 reads a network's output in voxels of the grid it sees; older files keep their meaning."""
    path, model, _ = _save(tmp_path)
    _, info = load_model(path)
    assert info.field_units == "voxels"
    _rewrite(path, format_version="2", field_units=None)
    old, info = load_model(path)
    assert info.field_units == "domain"
    moving, fixed = smooth_image((16, 16), seed=1), smooth_image((16, 16), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(old.steps[0](moving, fixed).field, model.steps[0](moving, fixed).field * 15)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path, _, _ = _save(tmp_path)
    meta, tensors = _read_raw(path)
    cfg = json.loads(meta["config"])
    cfg["model"]["steps"][0]["params"] = {"channels": [8, 8]}
    _rewrite(path, config=json.dumps(cfg))
    with pytest.raises(DataError, match="inconsistent header or weights"):
        load_model(path)


@pytest.mark.parametrize("kind", ["truncated", "header_only", "random", "empty", "pickle", "torch_save", "folder", "missing"])
def test_non_model_files_are_refused(tmp_path, kind):
    path, _, _ = _save(tmp_path)
    bad = tmp_path / "bad.safetensors"
    if kind == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "header_only":
        bad.write_bytes(path.read_bytes()[:6])
    elif kind == "random":
        bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "pickle":
        bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif kind == "torch_save":
        torch.save({"model": {"w": torch.zeros(3)}, "step": 1}, bad)
    elif kind == "folder":
        bad.mkdir()
    with pytest.raises(DataError) as err:
        load_model(bad)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message
    assert ("not a cyclereg model" in message) or ("does not exist" in message) or ("is not a file" in message)


def test_save_into_a_missing_folder_is_a_usage_error(tmp_path):
    from cyclereg.core.errors import UsageError

    model, info = _trained_like_model()
    with pytest.raises(UsageError, match="does not exist"):
        save_model(tmp_path / "no" / "model.safetensors", model, info)


def test_no_code_path_unpickles_user_files():
    """Source check: cyclereg never calls pickle's loaders, and torch.load only with weights_only=True."""
    import re
    from pathlib import Path

    import cyclereg

    for path in Path(cyclereg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"pickle\.(load|loads|Unpickler)\b", text), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (path, call.group(0))


def _model_at(spacing, downsamples, seed, channels=(4, 8)):
    raw = tiny_config_dict()
    raw["model"]["steps"] = [{"network": "unet", "downsample": f, "params": {"channels": list(channels)}} for f in downsamples]
    info = ModelInfo(config_from_dict(raw), (16, 16), Preprocessing(spacing=spacing))
    torch.manual_seed(seed)
    model = build_from_info(info)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t))
    return model, info


def test_a_model_initialises_the_steps_of_a_finer_model_that_see_the_same_grids(tmp_path):
    """A 4 mm model's steps (downsampled 2, then 1) start a 2 mm model's steps downsampled 4 and 2:
    the same grids. Its weights are copied exactly; the 2 mm model's extra step keeps its own."""
    coarse, coarse_info = _model_at((4.0, 4.0), (2, 1), seed=0)
    save_model(tmp_path / "coarse.safetensors", coarse, coarse_info)
    fine, fine_info = _model_at((2.0, 2.0), (4, 2, 1), seed=1)
    extra = {k: v.clone() for k, v in fine.state_dict().items() if k.startswith("steps.2.")}
    assert initialise_from(fine, fine_info, tmp_path / "coarse.safetensors") == 2
    state = fine.state_dict()
    for name, value in coarse.state_dict().items():
        assert torch.equal(state[name], value), name
    assert all(torch.equal(state[k], v) for k, v in extra.items())


@pytest.mark.parametrize("spacing, downsamples, channels, message", [
    ((2.0, 2.0), (2, 1), (4, 8), "model.steps[0].downsample"),  # a 2 mm model's first step sees 4 mm, not 8 mm
    ((4.0, 4.0), (2,), (4, 8), "has 2 steps; model.steps has only 1"),
    ((4.0, 4.0), (2, 1), (4, 16), "model.steps[0] is a unet with"),
])
def test_initialising_from_a_model_that_does_not_fit_is_refused(tmp_path, spacing, downsamples, channels, message):
    coarse, coarse_info = _model_at((4.0, 4.0), (2, 1), seed=0)
    save_model(tmp_path / "coarse.safetensors", coarse, coarse_info)
    other, other_info = _model_at(spacing, downsamples, seed=1, channels=channels)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(UsageError) as err:
        initialise_from(other, other_info, tmp_path / "coarse.safetensors")
    assert message in str(err.value) and "train.init" in str(err.value)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(DataError, match="train.init: model file .*missing.safetensors does not exist"):
        initialise_from(other, other_info, tmp_path / "missing.safetensors")


def test_initialising_across_pairwise_methods_works_and_into_cyclemorph_is_refused(tmp_path):
    """ICON and GradICON models hold their steps alike, so one starts the other; a CycleMorph model
    holds two networks (or one shared), so an ICON model cannot start it."""
    coarse, coarse_info = _model_at((4.0, 4.0), (2, 1), seed=0)
    save_model(tmp_path / "coarse.safetensors", coarse, coarse_info)
    for method, shared in (("gradicon", True), ("cyclemorph", False)):
        raw = tiny_config_dict()
        raw["model"].update(method=method, shared=shared,
                            steps=[{"network": "unet", "downsample": f, "params": {"channels": [4, 8]}} for f in (2, 1)])
        info = ModelInfo(config_from_dict(raw), (16, 16), Preprocessing(spacing=(4.0, 4.0)))
        model = build_from_info(info)
        if method == "gradicon":  # `shared` only concerns CycleMorph
            assert initialise_from(model, info, tmp_path / "coarse.safetensors") == 2
        else:
            with pytest.raises(UsageError, match="method icon; this config trains cyclemorph"):
                initialise_from(model, info, tmp_path / "coarse.safetensors")
