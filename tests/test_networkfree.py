"""Registration without a network (``register --model none``, and without ``--model`` where no model
ships): the affine stage, then the map optimised on the pair alone (``cyclereg.registration.networkfree``)."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

import cyclereg
from cyclereg.cli import main
from cyclereg.cli.common import add_io_options, tuning_of
from cyclereg.core.errors import UsageError
from cyclereg.models import shipped
from cyclereg.registration import networkfree
from cyclereg.registration.tuning import NETWORK_FREE, NO_IO

from conftest import smooth_image


@pytest.fixture(autouse=True)
def no_shipped_model(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "FOLDER", tmp_path / "weights")


def _write(array, path, spacing=None):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def shifted_pair(tmp_path, dim):
    """A smooth image and the same image shifted by two voxels along the last axis (2D 32², 3D 20³)."""
    n = 32 if dim == 2 else 20
    big = smooth_image((n + 8,) * dim, 1, seed=3)[0, 0].numpy()
    core = tuple(slice(4, 4 + n) for _ in range(dim))
    moved = tuple(slice(4, 4 + n) for _ in range(dim - 1)) + (slice(6, 6 + n),)
    return _write(big[core], tmp_path / "fixed.mha"), _write(big[moved], tmp_path / "moving.mha")


def _argv(fixed, moving, tmp_path, *extra):
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--affine", "none", "--device", "cpu",
            "--warped", str(tmp_path / "w.mha"), "--transform", str(tmp_path / "t.h5"), *extra]


def test_the_grid_keeps_the_voxel_budget_and_never_refines_the_image():
    brain = sitk.Image([256, 256, 256], sitk.sitkFloat32)  # 1 mm
    assert networkfree.preprocessing(brain).spacing == pytest.approx((4.0,) * 3)
    small = sitk.Image([28, 28], sitk.sitkFloat32)
    small.SetSpacing((0.5, 0.7))
    assert networkfree.preprocessing(small).spacing == (0.5, 0.5)  # its finest spacing: never finer
    photo = sitk.Image([1024, 1024], sitk.sitkFloat32)
    assert networkfree.preprocessing(photo).spacing == pytest.approx((2.0, 2.0))  # 512² voxels in 2D


def test_a_known_shift_is_undone_without_folds(shifted_pair, tmp_path, capsys):
    fixed, moving = shifted_pair
    assert main(_argv(fixed, moving, tmp_path, "--model", "none", "--io-field-steps", "150")) == 0
    summary = json.loads(capsys.readouterr().out)
    f, m = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (fixed, moving))
    w = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha")))
    inner = (slice(4, -4),) * f.ndim  # the shift brings in the border
    before, after = np.mean((m - f)[inner] ** 2), np.mean((w - f)[inner] ** 2)
    assert after < 0.25 * before
    assert summary["folds"] == 0
    # moving(x) = fixed(x + 2 voxels along ITK's x), so the written transform takes x to about x - 2 there.
    transform = sitk.ReadTransform(str(tmp_path / "t.h5"))
    field = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64,
                                                                     sitk.ReadImage(str(fixed)).GetSize()))
    assert np.median(field[inner][..., 0]) == pytest.approx(-2.0, abs=0.5)


def test_without_a_shipped_model_register_runs_without_a_network(shifted_pair, tmp_path, capsys):
    fixed, moving = shifted_pair
    assert main(_argv(fixed, moving, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "no default model ships with this cyclereg; registering without a network (--model none" in err
    default = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha")))
    assert main(_argv(fixed, moving, tmp_path, "--model", "none")) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha"))), default)
    from_api = cyclereg.register(fixed, moving, affine="none").warped
    np.testing.assert_allclose(sitk.GetArrayFromImage(from_api), default, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--io-steps", "5"], "--io-steps tunes a network's weights; --model none has no network (use --io-field-steps)"),
    (["--io-field-steps", "0"], "--model none: the map is optimised by --io-field-steps; expected at least 1 step"),
    (["--passes", "2"], "--passes runs a network several times; --model none has none"),
    (["--patch", "8", "8"], "--patch runs a network on patches; --model none has none"),
])
def test_network_options_are_refused_without_a_network(extra, message, tmp_path, capsys):
    fixed = _write(np.zeros((8, 8)), tmp_path / "f.mha")
    assert main(_argv(fixed, fixed, tmp_path, "--model", "none", *extra)) == 2
    assert capsys.readouterr().err == f"cyclereg: error: {message}\n"
    assert not (tmp_path / "w.mha").exists() and not (tmp_path / "t.h5").exists()


def test_io_options_not_given_take_the_defaults_of_the_model_or_of_no_network():
    parser = argparse.ArgumentParser()
    add_io_options(parser)
    assert tuning_of(parser.parse_args([])) == NO_IO
    assert tuning_of(parser.parse_args([]), networkfree=True) == NETWORK_FREE
    given = tuning_of(parser.parse_args(["--io-field-steps", "7"]), networkfree=True)
    assert given.field_steps == 7 and given.field_downsample == NETWORK_FREE.field_downsample
    assert tuning_of(parser.parse_args(["--io-field-steps", "7"])).field_downsample == NO_IO.field_downsample
    with pytest.raises(UsageError, match="--io-steps"):
        tuning_of(parser.parse_args(["--io-steps", "1"]), networkfree=True)


def test_more_field_steps_fit_the_pair_better(shifted_pair):
    fixed, moving = shifted_pair
    f = sitk.GetArrayFromImage(sitk.ReadImage(str(fixed)))
    inner = (slice(4, -4),) * f.ndim
    errors = [float(np.mean((sitk.GetArrayFromImage(cyclereg.register(fixed, moving, "none", affine="none",
                                                                        io_field_steps=n).warped) - f)[inner] ** 2))
              for n in (1, 100)]
    assert errors[1] < 0.5 * errors[0]


def test_evaluate_scores_pairs_without_a_network(tmp_path, capsys):
    labels = np.zeros((24, 24), np.float32)
    labels[6:14, 6:16] = 1
    labels[14:20, 8:18] = 2
    image = smooth_image((24, 24), 1, seed=1)[0, 0].numpy() + labels
    shifted = np.roll(image, 2, axis=1), np.roll(labels, 2, axis=1)
    paths = {"fixed": _write(image, tmp_path / "f.mha"), "fixed_labels": _write(labels, tmp_path / "fl.mha"),
             "moving": _write(shifted[0], tmp_path / "m.mha"), "moving_labels": _write(shifted[1], tmp_path / "ml.mha")}
    with open(tmp_path / "pairs.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, list(paths))
        writer.writeheader()
        writer.writerow({k: str(v) for k, v in paths.items()})
    argv = ["evaluate", "--model", "none", "--pairs-csv", str(tmp_path / "pairs.csv"), "--affine", "none", "--device", "cpu"]
    assert main(argv) == 0
    with_network_free = json.loads(capsys.readouterr().out)
    assert main([*argv, "--io-field-steps", "1", "--io-field-lr", "1e-6"]) == 0
    near_identity = json.loads(capsys.readouterr().out)
    assert with_network_free["n_pairs"] == 1 and with_network_free["dice"] > near_identity["dice"] + 0.05
    assert main(["evaluate", "--model", "none", "--dataset", "triangles"]) == 2
    assert "--model none registers image files: use --pairs-csv" in capsys.readouterr().err


def test_a_pairs_csv_is_registered_without_a_network(shifted_pair, tmp_path, capsys):
    fixed, moving = shifted_pair
    (tmp_path / "pairs.csv").write_text(f"fixed,moving,name\n{fixed},{moving},p\n")
    argv = ["register", "--model", "none", "--pairs-csv", str(tmp_path / "pairs.csv"), "--out-dir", str(tmp_path / "out"),
            "--affine", "none", "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    single = _argv(fixed, moving, tmp_path, "--model", "none")
    assert main(single) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "p_warped.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha"))))
