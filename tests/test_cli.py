"""The command line (cyclereg.cli), run in-process through ``main`` and once as a subprocess."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cyclereg.io.preprocess import Preprocessing
from cyclereg.cli import main
from cyclereg.core.config import config_from_dict
from cyclereg.models.modelfile import ModelInfo, build_from_info, load_model, save_model

from conftest import tiny_config_dict, write_toml
from test_data import write_mnist

def write_config(path, steps=6):
    """The tiny triangles config (conftest) with ``steps`` training steps, as a TOML file."""
    return write_toml(path, tiny_config_dict(train__steps=steps, train__lr=2e-3))


def run_cli(capsys, *argv):
    """``main(argv)``; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cyclereg: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, err)
    assert "Traceback" not in err


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained through the CLI (6 steps on 16×16 triangles)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root / "tiny.toml", steps=6)
    out = root / "run"
    code = main(["train", str(config), "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    return out


# --- help --------------------------------------------------------------------------------------

def test_module_help_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "cyclereg", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cyclereg")
    for command in ("train", "evaluate", "register", "demo"):
        assert command in result.stdout


def test_version_and_missing_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert "cyclereg 0." in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


# --- train ---------------------------------------------------------------------------------------

def test_train_writes_model_checkpoint_and_log(trained):
    assert (trained / "model.safetensors").is_file()
    assert (trained / "checkpoint.pt").is_file()
    records = read_log(trained / "log.jsonl")
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and "sim" in r and "icon" in r for r in records if "loss" in r)
    assert records[-1]["step"] == 6 and "val_dice" in records[-1]
    state = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6
    model, info = load_model(trained / "model.safetensors")
    assert info.shape == (16, 16) and info.intensity == (-1.0, 1.0)
    assert info.training["steps"] == 6
    assert info.training["data"] == {"dataset": "triangles", "images": 40, "shape": [16, 16]}
    assert info.training["final_heldout"]["dice"] == records[-1]["val_dice"]
    assert not list(trained.glob(".*"))  # no temporary files left


def test_train_resume_continues_to_more_steps(tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", steps=6)
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", config, "--out", out, "--steps", 3, "--quiet", "--device", "cpu")
    assert code == 0 and "model written to" in stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    # Lines logged after the checkpoint (a run killed before its next checkpoint) are dropped.
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n" + json.dumps({"step": 5, "val_dice": -1.0}) + "\n")
    code, _, _ = run_cli(capsys, "train", config, "--out", out, "--steps", 5, "--resume", "--quiet", "--device", "cpu")
    assert code == 0
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert records[-1]["step"] == 5 and "val_dice" in records[-1]
    assert all(r.get("loss", 0) >= 0 and r.get("val_dice", 0) >= 0 for r in records)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5

    # Resuming is exact: the same weights as one uninterrupted run of 5 steps.
    straight = tmp_path / "straight"
    assert run_cli(capsys, "train", config, "--out", straight, "--steps", 5, "--quiet", "--device", "cpu")[0] == 0
    resumed_model, _ = load_model(out / "model.safetensors")
    straight_model, _ = load_model(straight / "model.safetensors")
    for (name, a), b in zip(resumed_model.state_dict().items(), straight_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_train_refuses_to_overwrite_a_run_and_to_resume_nothing(trained, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml")
    before = (trained / "log.jsonl").read_text()
    code, _, err = run_cli(capsys, "train", config, "--out", trained, "--quiet")
    assert code == 2
    assert_one_line_error(err, "already holds a run", trained)
    assert (trained / "log.jsonl").read_text() == before


def test_resume_before_the_first_checkpoint_starts_over_and_a_complete_run_is_left_alone(trained, tmp_path, capsys):
    """A requeued job keeps its command line: ``--resume`` in a folder without a checkpoint (killed before
    its first one, a log line left behind) trains from step 0, bit-identical to a fresh run; ``--resume``
    of a complete run says so, exits 0 and leaves the model as it is."""
    config = write_config(tmp_path / "c.toml", steps=3)
    requeued = tmp_path / "requeued"
    requeued.mkdir()
    (requeued / "log.jsonl").write_text(json.dumps({"step": 1, "loss": -1.0}) + "\n")
    code, _, err = run_cli(capsys, "train", config, "--out", requeued, "--resume", "--quiet", "--device", "cpu")
    assert code == 0 and f"no checkpoint in {requeued} yet; starting from step 0" in err
    assert all(r.get("loss", 0) >= 0 for r in read_log(requeued / "log.jsonl"))
    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "train", config, "--out", fresh, "--quiet", "--device", "cpu")[0] == 0
    for (name, a), b in zip(load_model(requeued / "model.safetensors")[0].state_dict().items(),
                            load_model(fresh / "model.safetensors")[0].state_dict().values()):
        assert torch.equal(a, b), name
    before = (fresh / "model.safetensors").read_bytes(), (fresh / "model.safetensors").stat().st_mtime_ns
    code, stdout, err = run_cli(capsys, "train", config, "--out", fresh, "--resume", "--quiet", "--device", "cpu")
    assert code == 0 and "is complete (step 3 of 3)" in err and "model written to" in stdout
    assert ((fresh / "model.safetensors").read_bytes(), (fresh / "model.safetensors").stat().st_mtime_ns) == before


def test_resume_with_another_model_config_is_refused(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    config = write_config(tmp_path / "c.toml", steps=8)
    code, _, err = run_cli(capsys, "train", config, "--out", copy, "--resume", "--set", "model.lam=2", "--quiet")
    assert code == 2
    assert_one_line_error(err, "another config: model.lam differs")
    for option, key in (("train.lr=0.5", "train.lr"), ("data.size=20", "data.size")):
        code, _, err = run_cli(capsys, "train", config, "--out", copy, "--resume", "--set", option, "--quiet")
        assert code == 2
        assert_one_line_error(err, f"another config: {key} differs")



def test_resume_of_a_checkpoint_from_before_a_config_key_existed(trained, tmp_path, capsys):
    """A checkpoint written before cyclereg had a key (here the label supervision ones) resumes: the key
    counts as its default; set to another value it is refused by name."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    del state["config"]["model"]["label_weight"], state["config"]["data"]["label_list"]
    torch.save(state, copy / "checkpoint.pt")
    config = write_config(tmp_path / "c.toml", steps=int(state["step"]) + 1)
    code, _, err = run_cli(capsys, "train", config, "--out", copy, "--resume", "--quiet", "--device", "cpu")
    assert code == 0, err
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == int(state["step"]) + 1
    code, _, err = run_cli(capsys, "train", config, "--out", copy, "--resume", "--set", "data.label_list=[3]", "--quiet")
    assert code == 2
    assert_one_line_error(err, "another config: data.label_list differs")

# --- evaluate ----------------------------------------------------------------------------------------

def test_evaluate_writes_the_summary(trained, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code, stdout, _ = run_cli(capsys, "evaluate", "--model", trained / "model.safetensors", "--dataset", "triangles",
                              "--pairs", 4, "--json", out, "--device", "cpu")
    assert code == 0
    summary = json.loads(out.read_text())
    assert set(summary) == {"n_pairs", "dice", "folds", "folds_percent", "ic_error", "ic_error_unit", "seconds_per_pair"}
    assert summary["n_pairs"] == 4
    assert 0 <= summary["dice"] <= 1 and summary["folds"] >= 0 and summary["ic_error"] >= 0
    assert math.isclose(summary["folds_percent"], 100 * summary["folds"] / 15**2)
    assert json.loads(stdout) == summary


def test_evaluate_refines_the_maps_when_asked(trained, tmp_path, capsys):
    """``--io-field-steps`` reaches the dataset path too: both directions refined, other scores."""
    scores = {}
    for name, extra in (("plain", []), ("refined", ["--io-field-steps", "20", "--io-field-lr", "0.3"])):
        code, stdout, err = run_cli(capsys, "evaluate", "--model", trained / "model.safetensors", "--dataset", "triangles",
                                    "--pairs", 2, "--device", "cpu", *extra)
        assert code == 0, err
        scores[name] = json.loads(stdout)
    assert scores["refined"]["n_pairs"] == 2 and 0 <= scores["refined"]["dice"] <= 1
    assert scores["refined"]["ic_error"] != scores["plain"]["ic_error"]


def test_evaluate_mnist_checks_the_model_shape(trained, tmp_path, capsys):
    write_mnist(tmp_path, n=40, split="test")
    out = tmp_path / "scores.json"
    code, _, err = run_cli(capsys, "evaluate", "--model", trained / "model.safetensors", "--dataset", "mnist",
                           "--root", tmp_path, "--split", "test", "--digit", 3, "--pairs", 2, "--json", out)
    assert code == 2
    assert_one_line_error(err, "(16, 16)", "(28, 28)")
    assert not out.exists()


# --- register ------------------------------------------------------------------------------------------

def _blob_image(size, spacing, origin, centre, pixel=sitk.sitkFloat32, direction=None):
    """A smooth blob (ITK size x, y) with the given geometry; ``centre`` in domain units (x, y)."""
    x = np.linspace(0, 1, size[0])[None, :]
    y = np.linspace(0, 1, size[1])[:, None]
    array = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / 0.05) + 0.3 * x
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return sitk.Cast(image, pixel)


@pytest.fixture
def pair_files(tmp_path):
    c, s = math.cos(0.35), math.sin(0.35)  # the fixed image is rotated in physical space
    fixed = _blob_image((23, 19), (0.8, 1.3), (5.0, -3.0), (0.5, 0.45), direction=(c, -s, s, c))
    moving = _blob_image((20, 22), (1.1, 0.7), (-2.0, 4.0), (0.55, 0.5))
    labels_array = np.zeros((22, 20), np.uint8)
    labels_array[4:12, 3:9] = 3
    labels_array[10:20, 10:18] = 7
    labels = sitk.GetImageFromArray(labels_array)
    labels.CopyInformation(moving)
    paths = {"fixed": tmp_path / "fixed.mha", "moving": tmp_path / "moving.nii.gz", "labels": tmp_path / "labels.nii.gz"}
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    return paths


def _same_geometry(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_register_writes_every_output_on_the_fixed_grid(trained, pair_files, tmp_path, capsys):
    out = {name: tmp_path / name for name in ("warped.mha", "jac.nii.gz", "t.h5", "t.nii.gz", "wl.nii.gz")}
    code, stdout, err = run_cli(capsys, "register", "--model", trained / "model.safetensors",
                                "--fixed", pair_files["fixed"], "--moving", pair_files["moving"],
                                "--warped", out["warped.mha"], "--jacobian", out["jac.nii.gz"],
                                "--transform", out["t.h5"], "--moving-labels", pair_files["labels"],
                                "--warped-labels", out["wl.nii.gz"], "--device", "cpu")
    assert code == 0, err
    summary = json.loads(stdout)
    assert {"folds", "jacobian_min", "jacobian_max"} <= set(summary)
    fixed = sitk.ReadImage(str(pair_files["fixed"]))
    moving = sitk.ReadImage(str(pair_files["moving"]))

    warped = sitk.ReadImage(str(out["warped.mha"]))
    _same_geometry(warped, fixed)
    assert warped.GetPixelID() == moving.GetPixelID()

    jac = sitk.ReadImage(str(out["jac.nii.gz"]))
    _same_geometry(jac, fixed)
    assert np.isfinite(sitk.GetArrayFromImage(jac)).all()

    labels = sitk.ReadImage(str(pair_files["labels"]))
    warped_labels = sitk.ReadImage(str(out["wl.nii.gz"]))
    _same_geometry(warped_labels, fixed)
    assert warped_labels.GetPixelID() == labels.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayFromImage(warped_labels)).tolist())
    assert values <= {0, 3, 7} and {3, 7} <= values

    # The .h5 transform resamples the moving image like --warped (ITK: fixed point + u = moving point).
    # The same inside and outside the moving image (ITK's rules for the border are followed).
    transform = sitk.ReadTransform(str(out["t.h5"]))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(warped)
    value_range = np.ptp(sitk.GetArrayFromImage(moving))
    assert np.abs(resampled - ours).max() < 1e-3 * value_range

    # The same displacement as a vector image.
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", pair_files["fixed"],
                           "--moving", pair_files["moving"], "--transform", out["t.nii.gz"], "--device", "cpu")
    assert code == 0, err
    field = sitk.ReadImage(str(out["t.nii.gz"]))
    _same_geometry(field, fixed)
    assert field.GetNumberOfComponentsPerPixel() == 2
    as_transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    resampled2 = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, as_transform, sitk.sitkLinear, 0.0))
    assert np.abs(resampled2 - ours).max() < 1e-3 * value_range


def test_register_with_an_identity_model_is_the_identity_in_physical_space(pair_files, tmp_path, capsys):
    """An untrained model predicts no deformation: every fixed voxel maps to the same physical point,
    the Jacobian is 1, and the warped image is the moving image resampled onto the fixed grid."""
    info = ModelInfo(config_from_dict(tiny_config_dict()), (16, 16), Preprocessing(range=(-1.0, 1.0)))
    model_path = tmp_path / "identity.safetensors"
    save_model(model_path, build_from_info(info).eval(), info)
    out_t, out_j, out_w = tmp_path / "t.nii.gz", tmp_path / "jac.mha", tmp_path / "w.mha"
    code, _, err = run_cli(capsys, "register", "--model", model_path, "--fixed", pair_files["fixed"],
                           "--moving", pair_files["moving"], "--transform", out_t, "--jacobian", out_j,
                           "--warped", out_w, "--device", "cpu", "--affine", "none")
    assert code == 0, err
    fixed = sitk.ReadImage(str(pair_files["fixed"]))
    moving = sitk.ReadImage(str(pair_files["moving"]))
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out_t))), 0.0, atol=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out_j))), 1.0, atol=1e-4)
    expected = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out_w))), expected, atol=1e-4)


# --- demo ------------------------------------------------------------------------------------------------

def test_demo_writes_metrics_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(capsys, "demo", "--steps", 3, "--out", out)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_pairs"] == 100 and 0 <= metrics["dice"] <= 1 and metrics["train_seconds"] > 0
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "run" / "model.safetensors").is_file()


# --- bad input ---------------------------------------------------------------------------------------

def test_missing_model_file(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    out = tmp_path / "s.json"
    code, _, err = run_cli(capsys, "evaluate", "--model", missing, "--pairs", 2, "--json", out)
    assert code == 1
    assert_one_line_error(err, missing, "does not exist")
    assert not out.exists()


def test_corrupt_model_file(tmp_path, pair_files, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    warped = tmp_path / "w.mha"
    code, _, err = run_cli(capsys, "register", "--model", corrupt, "--fixed", pair_files["fixed"],
                           "--moving", pair_files["moving"], "--warped", warped)
    assert code == 1
    assert_one_line_error(err, corrupt, "not a cyclereg model")
    assert not warped.exists()


def test_unknown_config_key(tmp_path, capsys):
    config = write_config(tmp_path / "c.toml")
    config.write_text(config.read_text().replace("lam = 64.0", "lamda = 64.0"))
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", config, "--out", out, "--quiet")
    assert code == 2
    assert_one_line_error(err, "'model.lamda'")
    assert not out.exists()
    code, _, err = run_cli(capsys, "train", write_config(tmp_path / "ok.toml"), "--out", out, "--set", "train.stepz=3")
    assert code == 2
    assert_one_line_error(err, "'train.stepz'")
    assert not out.exists()


def test_wrong_digit(trained, tmp_path, capsys):
    root = tmp_path / "mnist"
    root.mkdir()
    write_mnist(root, n=30)
    out = tmp_path / "s.json"
    code, _, err = run_cli(capsys, "evaluate", "--model", trained / "model.safetensors", "--dataset", "mnist",
                           "--root", root, "--digit", 12, "--pairs", 2, "--json", out)
    assert code == 2
    assert_one_line_error(err, "--digit", "12")
    assert not out.exists()


def test_missing_fixed_file(trained, pair_files, tmp_path, capsys):
    missing = tmp_path / "nofixed.mha"
    warped = tmp_path / "w.mha"
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", missing,
                           "--moving", pair_files["moving"], "--warped", warped)
    assert code == 1
    assert_one_line_error(err, "--fixed", missing)
    assert not warped.exists()
    assert not list(tmp_path.glob(".w*"))


def test_register_needs_an_output_and_an_existing_output_folder(trained, pair_files, tmp_path, capsys):
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", pair_files["fixed"],
                           "--moving", pair_files["moving"])
    assert code == 2
    assert_one_line_error(err, "--warped")
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", pair_files["fixed"],
                           "--moving", pair_files["moving"], "--warped", tmp_path / "no" / "w.mha")
    assert code == 2
    assert_one_line_error(err, "does not exist")


def test_register_rejects_labels_of_another_size(trained, pair_files, tmp_path, capsys):
    small = sitk.Image([5, 5], sitk.sitkUInt8)
    sitk.WriteImage(small, str(tmp_path / "small.nii.gz"))
    out = tmp_path / "wl.nii.gz"
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", pair_files["fixed"],
                           "--moving", pair_files["moving"], "--moving-labels", tmp_path / "small.nii.gz",
                           "--warped-labels", out)
    assert code == 1
    assert_one_line_error(err, "--moving-labels")
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    from cyclereg.core.errors import DataError

    with pytest.raises(DataError):
        main(["--debug", "evaluate", "--model", str(tmp_path / "nope.safetensors")])


def test_register_rejects_unreadable_and_wrong_dimension_images(trained, pair_files, tmp_path, capsys):
    text = tmp_path / "notes.mha"
    text.write_text("not an image\n")
    warped = tmp_path / "w.mha"
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", pair_files["fixed"],
                           "--moving", text, "--warped", warped)
    assert code == 1
    assert_one_line_error(err, "--moving", text, "cannot be read")
    volume = tmp_path / "volume.mha"
    sitk.WriteImage(sitk.Image([6, 6, 6], sitk.sitkFloat32) + 1.0, str(volume))
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", volume,
                           "--moving", pair_files["moving"], "--warped", warped)
    assert code == 1
    assert_one_line_error(err, "--fixed", "3D", "2D")
    assert not warped.exists()


def test_register_and_evaluate_in_passes(trained, pair_files, tmp_path, capsys):
    """``--passes N`` runs the model N times: another valid map than one pass; 0 passes is refused
    before anything is written."""
    model = trained / "model.safetensors"
    base = ["register", "--model", model, "--fixed", pair_files["fixed"], "--moving", pair_files["moving"], "--device", "cpu"]
    fields = {}
    for passes in (1, 3):
        out = tmp_path / f"field{passes}.nii.gz"
        code, stdout, err = run_cli(capsys, *base, "--transform", out, "--passes", passes)
        assert code == 0, err
        assert json.loads(stdout.strip().splitlines()[-1])["folds"] == 0
        fields[passes] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.isfinite(fields[3]).all() and np.abs(fields[3] - fields[1]).max() > 1e-4
    code, _, err = run_cli(capsys, *base, "--warped", tmp_path / "w.nii.gz", "--passes", 0)
    assert code == 2
    assert_one_line_error(err, "--passes", "at least 1")
    assert not (tmp_path / "w.nii.gz").exists()
    code, stdout, err = run_cli(capsys, "evaluate", "--model", model, "--pairs", 4, "--passes", 2, "--device", "cpu")
    assert code == 0, err
    assert 0 <= json.loads(stdout)["dice"] <= 1


def test_evaluate_rejects_zero_pairs(trained, capsys):
    code, _, err = run_cli(capsys, "evaluate", "--model", trained / "model.safetensors", "--pairs", 0)
    assert code == 2
    assert_one_line_error(err, "--pairs")


def test_resume_tolerates_a_log_line_cut_short_by_a_crash(tmp_path):
    from cyclereg.training.train import _trim_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 10, "loss": 1}\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    _trim_log(log, 20)
    assert log.read_text() == '{"step": 10, "loss": 1}\n{"step": 20, "loss": 0.5}\n'


def test_register_a_csv_of_pairs_with_one_model_and_split_across_ranks(trained, pair_files, tmp_path, capsys, monkeypatch):
    model = trained / "model.safetensors"
    csv = tmp_path / "pairs.csv"
    csv.write_text("fixed,moving,moving_labels,name\n"
                   f"{pair_files['fixed']},{pair_files['moving']},{pair_files['labels']},first\n"
                   f"{pair_files['moving']},{pair_files['fixed']},,\n"
                   f"{pair_files['fixed']},{pair_files['fixed']},,self\n")
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run_cli(capsys, "register", "--model", model, "--pairs-csv", csv, "--out-dir", out,
                                "--outputs", "warped,jacobian")
    assert code == 0, err
    names = [json.loads(line)["name"] for line in stdout.splitlines()]
    assert names == ["first", "fixed_to_moving", "self"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}_{k}" for n in names for k in ("warped.nii.gz", "jacobian.nii.gz")] + ["first_warped_labels.nii.gz"])
    single = tmp_path / "single.nii.gz"
    code, _, _ = run_cli(capsys, "register", "--model", model, "--fixed", pair_files["fixed"], "--moving",
                         pair_files["moving"], "--warped", single)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(single))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(out / "first_warped.nii.gz"))))
    # Under torchrun, process 1 of 2 takes rows 1, 3, ...
    split = tmp_path / "split"
    split.mkdir()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, stdout, _ = run_cli(capsys, "register", "--model", model, "--pairs-csv", csv, "--out-dir", split)
    assert code == 0 and [json.loads(line)["name"] for line in stdout.splitlines()] == ["fixed_to_moving"]
    assert sorted(p.name for p in split.iterdir()) == ["fixed_to_moving_transform.h5", "fixed_to_moving_warped.nii.gz"]


def test_a_batch_rerun_after_a_crash_does_only_the_pairs_left(trained, pair_files, tmp_path, capsys):
    """``--out-dir`` is created; a rerun skips the pairs whose outputs are all there and registers the
    rest (a pair that lost an output is done again), leaving the finished files untouched; ``--overwrite``
    redoes every pair."""
    csv = tmp_path / "pairs.csv"
    csv.write_text("fixed,moving,name\n" + "".join(f"{pair_files['fixed']},{pair_files['moving']},p{i}\n" for i in range(3)))
    out = tmp_path / "new" / "out"
    argv = ["register", "--model", trained / "model.safetensors", "--pairs-csv", csv, "--out-dir", out, "--affine", "none"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert all("folds" in json.loads(line) for line in stdout.splitlines())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(stamps) == 6
    (out / "p1_transform.h5").unlink()  # the batch died while writing pair 1's transform
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    done = {json.loads(line)["name"]: json.loads(line).get("skipped", False) for line in stdout.splitlines()}
    assert done == {"p0": True, "p1": False, "p2": True}
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(after) == sorted(stamps)
    assert all(after[k] == stamps[k] for k in after if not k.startswith("p1_"))
    code, stdout, _ = run_cli(capsys, *argv, "--overwrite")
    assert code == 0 and not any(json.loads(line).get("skipped") for line in stdout.splitlines())


def test_an_evaluation_rerun_after_a_crash_scores_only_the_pairs_left(trained, pair_files, tmp_path, capsys, monkeypatch):
    """``--per-pair`` is rewritten whole after every pair; a rerun takes the pairs already in it and scores
    the rest: no pair scored twice, no row duplicated, the same summary as one uninterrupted run."""
    from cyclereg.evaluation import files

    csv_path = tmp_path / "pairs.csv"
    pairs = [(pair_files["fixed"], pair_files["moving"]), (pair_files["moving"], pair_files["fixed"]),
             (pair_files["fixed"], pair_files["fixed"])]
    csv_path.write_text("fixed,moving\n" + "".join(f"{f},{m}\n" for f, m in pairs))
    per_pair, summary = tmp_path / "per_pair.csv", tmp_path / "s.json"
    argv = ["evaluate", "--model", trained / "model.safetensors", "--pairs-csv", csv_path, "--per-pair", per_pair,
            "--json", summary, "--affine", "none"]
    assert run_cli(capsys, *argv)[0] == 0
    whole = per_pair.read_text().splitlines()
    first = {k: v for k, v in json.loads(summary.read_text()).items() if k != "seconds_per_pair"}
    assert len(whole) == 4 and [line.split(",")[0] for line in whole[1:]] == ["0", "1", "2"]
    per_pair.write_text("\n".join(whole[:2] + whole[3:]) + "\n")  # the run died while scoring pair 1
    calls = []
    real = files._score_pair
    monkeypatch.setattr(files, "_score_pair", lambda *a, **k: calls.append(a[2]["pair"]) or real(*a, **k))
    assert run_cli(capsys, *argv)[0] == 0
    assert calls == [1]
    assert per_pair.read_text().splitlines()[0] == whole[0] and len(per_pair.read_text().splitlines()) == 4
    again = {k: v for k, v in json.loads(summary.read_text()).items() if k != "seconds_per_pair"}
    assert again.keys() == first.keys()
    for key, value in first.items():
        assert again[key] == (pytest.approx(value, rel=1e-6, nan_ok=True) if isinstance(value, float) else value), key
    calls.clear()
    assert run_cli(capsys, *argv, "--overwrite")[0] == 0 and calls == [0, 1, 2]


def test_register_csv_refuses_duplicate_names_and_mixed_options(trained, pair_files, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"fixed,moving\n{pair_files['fixed']},{pair_files['moving']}\n{pair_files['fixed']},{pair_files['moving']}\n")
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--pairs-csv", csv,
                           "--out-dir", tmp_path)
    assert code == 1
    assert_one_line_error(err, "line 3", "moving_to_fixed", "line 2", "column 'name'")
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--pairs-csv", csv,
                           "--out-dir", tmp_path, "--warped", tmp_path / "w.nii.gz")
    assert code == 2 and "--pairs-csv replaces" in err
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--pairs-csv", csv,
                           "--out-dir", tmp_path, "--outputs", "warped,nonsense")
    assert code == 2 and "--outputs" in err
    code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--out-dir", tmp_path)
    assert code == 2 and "--fixed and --moving" in err


def test_register_with_compile_gives_the_uncompiled_result_and_reports_compile_time(trained, pair_files, tmp_path, capsys):
    outputs = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / f"warped{len(flag)}.nii.gz"
        code, _, err = run_cli(capsys, "register", "--model", trained / "model.safetensors", "--fixed", pair_files["fixed"],
                               "--moving", pair_files["moving"], "--warped", out, *flag)
        assert code == 0, err
        outputs[bool(flag)] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        if flag:
            assert "torch.compile:" in err and " s to compile for 16x16" in err
    np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-4)


@pytest.fixture(scope="module")
def two_step_model(tmp_path_factory):
    """A model file of two steps, the first downsampled 2, the second trained on patches."""
    tmp_path = tmp_path_factory.mktemp("two_step")
    raw = tiny_config_dict(train__steps=4)
    raw["model"]["steps"] = [{"network": "unet", "downsample": 2, "params": {"channels": [4, 8]}},
                             {"network": "unet", "params": {"channels": [4, 8]}}]
    raw["train"]["stages"] = [{"fraction": 0.5, "train": [0]}, {"fraction": 0.5, "train": [1], "patch": [8, 8]}]
    config = write_toml(tmp_path / "two.toml", raw)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"]) == 0
    return tmp_path / "run" / "model.safetensors"


def test_register_on_patches_with_a_two_step_model(two_step_model, tmp_path, pair_files, capsys):
    """``--patch`` runs the second step on blended patches: one patch covering the model grid gives
    the whole-image result; smaller patches give a valid map; wrong options are named."""
    model = two_step_model
    base = ["register", "--model", model, "--fixed", pair_files["fixed"], "--moving", pair_files["moving"], "--device", "cpu",
            "--affine", "none"]
    outputs = {}
    for name, extra in (("whole", []), ("one patch", ["--patch", "64", "64"]), ("patches", ["--patch", "10", "12", "--overlap", "4", "4"])):
        out = tmp_path / f"{name}.nii.gz"
        code, stdout, err = run_cli(capsys, *base, "--transform", out, *extra)
        assert code == 0, err
        assert json.loads(stdout.strip().splitlines()[-1])["folds"] == 0, stdout
        outputs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.abs(outputs["one patch"] - outputs["whole"]).max() < 1e-5
    assert np.isfinite(outputs["patches"]).all()
    csv = tmp_path / "pairs.csv"  # a CSV of pairs runs on patches too, with the same result
    csv.write_text(f"fixed,moving,name\n{pair_files['fixed']},{pair_files['moving']},p\n")
    code, _, err = run_cli(capsys, "register", "--model", model, "--pairs-csv", csv, "--out-dir", tmp_path,
                           "--outputs", "transform", "--patch", "10", "12", "--overlap", "4", "4", "--device", "cpu",
                           "--affine", "none")
    assert code == 0, err
    h5 = sitk.ReadTransform(str(tmp_path / "p_transform.h5"))
    field = sitk.GetArrayFromImage(sitk.DisplacementFieldTransform(h5).GetDisplacementField())
    assert np.abs(field - outputs["patches"]).max() < 1e-5

    for extra, message in ((["--patch", "8"], "--patch: expected 2 sizes"), (["--overlap", "2", "2"], "--overlap goes with --patch"),
                           (["--patch", "8", "8", "--overlap", "8", "1"], "--overlap: expected 2 overlaps"),
                           (["--patch", "8", "8", "--io-steps", "2"], "does not combine with --io-steps")):
        code, _, err = run_cli(capsys, *base, "--warped", tmp_path / "w.nii.gz", *extra)
        assert code == 2
        assert_one_line_error(err, message)
        assert not (tmp_path / "w.nii.gz").exists()


def test_instance_optimisation_of_the_downsampled_steps_then_of_the_field(two_step_model, trained, tmp_path, pair_files, capsys):
    """``--io-downsample 2`` tunes the downsampled first step on the pair downsampled 2: a valid map,
    another than the model's alone; ``--io-field-steps`` then refines that map into another valid one.
    A factor that is not 1, 2 or 4, a model whose first step is not downsampled, or a field step of 0
    voxels is refused before anything is written."""
    base = ["register", "--fixed", pair_files["fixed"], "--moving", pair_files["moving"], "--device", "cpu"]
    fields = {}
    tuned = ["--io-steps", "5", "--io-lr", "1e-3", "--io-downsample", "2"]
    refined = [*tuned, "--io-field-steps", "5", "--io-field-downsample", "2"]
    for name, extra in (("alone", []), ("tuned", tuned), ("refined", refined)):
        out = tmp_path / f"{name}.nii.gz"
        code, stdout, err = run_cli(capsys, *base, "--model", two_step_model, "--transform", out, *extra)
        assert code == 0, err
        fields[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.isfinite(fields["tuned"]).all() and np.abs(fields["tuned"] - fields["alone"]).max() > 1e-4
    assert np.isfinite(fields["refined"]).all() and np.abs(fields["refined"] - fields["tuned"]).max() > 1e-4
    for model, extra, message in ((two_step_model, ["--io-downsample", "3"], "--io-downsample: expected 1, 2 or 4"),
                                  (trained / "model.safetensors", ["--io-downsample", "2"], "first step is not downsampled"),
                                  (two_step_model, ["--io-field-steps", "2", "--io-field-lr", "0"], "--io-field-lr: expected")):
        warped = tmp_path / "w.nii.gz"
        code, _, err = run_cli(capsys, *base, "--model", model, "--warped", warped, "--io-steps", "2", *extra)
        assert code == 2
        assert_one_line_error(err, message)
        assert not warped.exists()
