"""Training on a folder of 3D scans, then register, warp and evaluate from files, as a user would."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cyclereg.core.config import config_from_dict
from cyclereg.models.modelfile import load_model
from cyclereg.data.volumes import ScanSet

from test_cli import assert_one_line_error, run_cli
from test_physical import blob

SPACING = (1.5, 1.5, 1.5)


def _scan(path, seed, size=(20, 18, 16), spacing=(1.0, 1.2, 1.4)):
    image = blob(size, spacing, (-10.0, -8.0, -6.0), seed=seed)
    sitk.WriteImage(image, str(path))
    labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 60).astype(np.int16) * 5)
    labels.CopyInformation(image)
    return image, labels


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    (root / "t1").mkdir()
    for seed in range(2):
        _, labels = _scan(root / "t1" / f"subject{seed}.nii.gz", seed)
        sitk.WriteImage(labels, str(root / f"subject{seed}_labels.nii.gz"))
    return root


def folder_config(root, **data):
    raw = {"data": {"dataset": "folder", "root": str(root), "pattern": "*.nii.gz", "spacing": list(SPACING),
                    "pad_multiple": 4, "intensity": "percentile", "deform": 1.0, "smoothness": 3,
                    "intensity_augment": True, "val_pairs": 2, **data},
           "model": {"method": "gradicon", "similarity": "lncc", "lam": 0.5,
                     "steps": [{"network": "unet", "downsample": 2, "params": {"channels": [4, 8]}},
                               {"network": "unet", "params": {"channels": [4, 8]}}]},
           "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1, "val_every": 1000, "checkpoint_every": 2}}
    return config_from_dict(raw)


def test_scan_set_prepares_scans_on_one_model_grid(scans):
    data = ScanSet(folder_config(scans / "t1").data)
    # 20 x 1.0 / 1.5 = 13 -> 16; 18 x 1.2 / 1.5 = 14 -> 16; 16 x 1.4 / 1.5 = 15 -> 16 (ITK order x, y, z)
    assert data.grid.size == (16, 16, 16) and data.shape == (16, 16, 16)
    assert len(data.images) == 2 and all(image.shape == (1, 1, 16, 16, 16) for image in data.images)
    assert all(0 <= float(image.min()) and float(image.max()) <= 1 + 1e-6 for image in data.images)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    m1, f1 = data.pair(g1)
    m2, f2 = data.pair(g2)
    assert m1.shape == (1, 1, 16, 16, 16)
    assert torch.equal(m1, m2) and torch.equal(f1, f2) and not torch.equal(m1, f1)
    vm, vf = data.heldout()
    assert vm.shape == (2, 1, 16, 16, 16) and torch.equal(vm, data.heldout()[0])


def test_folder_errors_name_the_key(tmp_path):
    from cyclereg.core.errors import DataError

    with pytest.raises(DataError, match="data.pattern"):
        ScanSet(folder_config(tmp_path).data)
    with pytest.raises(DataError, match="neither a folder nor a CSV"):
        ScanSet(folder_config(tmp_path / "nothing.txt").data)


@pytest.fixture(scope="module")
def trained3d(scans, tmp_path_factory):
    from cyclereg.training.train import train

    out = tmp_path_factory.mktemp("run3d")
    train(folder_config(scans / "t1"), out, device="cpu", progress=False)
    return out / "model.safetensors"


def test_model_file_records_the_preprocessing(trained3d):
    _, info = load_model(trained3d)
    assert info.preprocess.spacing == SPACING and info.preprocess.intensity == "percentile"
    assert info.preprocess.pad_multiple == 4 and info.shape == (16, 16, 16)


def test_register_warp_and_evaluate_from_files(trained3d, scans, tmp_path, capsys):
    fixed, moving = scans / "t1" / "subject0.nii.gz", scans / "t1" / "subject1.nii.gz"
    out = {k: tmp_path / v for k, v in (("w", "warped.nii.gz"), ("l", "labels.nii.gz"), ("t", "t.h5"),
                                          ("j", "jac.nii.gz"), ("fig", "fig.png"), ("w2", "w2.nii.gz"))}
    code, stdout, err = run_cli(capsys, "register", "--model", trained3d, "--fixed", fixed, "--moving", moving,
                                "--warped", out["w"], "--transform", out["t"], "--jacobian", out["j"],
                                "--moving-labels", scans / "subject1_labels.nii.gz", "--warped-labels", out["l"],
                                "--figure", out["fig"], "--device", "cpu")
    assert code == 0, err
    assert json.loads(stdout)["folds"] >= 0
    fixed_img = sitk.ReadImage(str(fixed))
    for key in ("w", "l", "j"):
        assert sitk.ReadImage(str(out[key])).GetSize() == fixed_img.GetSize()
    assert out["fig"].stat().st_size > 0
    code, _, err = run_cli(capsys, "warp", "--transform", out["t"], "--moving", moving, "--fixed", fixed, "--out", out["w2"])
    assert code == 0, err
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(out[k]))) for k in ("w", "w2"))
    assert np.abs(a - b).max() < 1e-3 * np.ptp(sitk.GetArrayFromImage(sitk.ReadImage(str(moving))))

    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        writer.writerow([fixed, moving, scans / "subject0_labels.nii.gz", scans / "subject1_labels.nii.gz"])
        writer.writerow([moving, fixed, scans / "subject1_labels.nii.gz", scans / "subject0_labels.nii.gz"])
    code, stdout, err = run_cli(capsys, "evaluate", "--model", trained3d, "--pairs-csv", pairs, "--labels", "5",
                                "--per-pair", tmp_path / "per_pair.csv", "--json", tmp_path / "s.json", "--device", "cpu")
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["n_pairs"] == 2 and 0 < summary["dice"] <= 1 and summary["hd95"] >= 0
    assert {"folds", "folds_percent", "ic_error", "seconds_per_pair", "log_jacobian_std"} <= set(summary)
    assert set(summary["dice_per_label"]) == {"5"}
    rows = list(csv.DictReader((tmp_path / "per_pair.csv").open()))
    assert len(rows) == 2 and {"dice_5", "hd95_5", "volume_fixed_5", "volume_warped_5"} <= set(rows[0])
    assert float(rows[0]["volume_fixed_5"]) > 0


@pytest.mark.parametrize("case", ["4d", "nan", "2d_for_3d_model", "unreadable"])
def test_bad_inputs_to_register_give_one_line_errors_and_write_nothing(trained3d, scans, tmp_path, capsys, case):
    good = scans / "t1" / "subject0.nii.gz"
    bad = tmp_path / ("bad.mha" if case == "nan" else "bad.nii.gz")  # NIfTI does not keep a NaN here
    if case == "4d":
        sitk.WriteImage(sitk.Image([6, 6, 6, 3], sitk.sitkFloat32), str(bad))
    elif case == "nan":
        array = np.ones((8, 8, 8), np.float32)
        array[3, 3, 3] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(bad))
    elif case == "2d_for_3d_model":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(10, 10).astype(np.float32)), str(bad))
    else:
        bad.write_text("this is not an image")
    out = tmp_path / "warped.nii.gz"
    code, _, err = run_cli(capsys, "register", "--model", trained3d, "--fixed", good, "--moving", bad,
                           "--warped", out, "--device", "cpu")
    assert code == 1
    assert_one_line_error(err, "--moving")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_scans_in_their_own_spaces_are_aligned_to_the_space_once(tmp_path):
    """``data.align = "affine"``: a scan rotated by 60 degrees and moved, stored with other axes, lands on
    the space's scan once aligned (not without); the cache keeps the aligned scan; the model grid takes
    the space's axes and the preprocessing records them."""
    from test_affine import _moved, _phantom, _rotation

    root = tmp_path / "scans"
    root.mkdir()
    space = _phantom(3)
    other = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # the second scan's own axes
    moved, _ = _moved(space, _rotation(0, 60), (6.0, -4.0, 3.0), direction=other.ravel().tolist())
    sitk.WriteImage(space, str(root / "a.nii.gz"))
    sitk.WriteImage(moved, str(root / "b.nii.gz"))
    prepared = {}
    for align in ("none", "affine"):
        cfg = folder_config(root, spacing=[2.0] * 3, align=align, cache=str(tmp_path / f"cache_{align}"), pad_multiple=1).data
        data = ScanSet(cfg)
        a, b = (x[0, 0].numpy() for x in data.images)
        prepared[align] = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        if align == "affine":
            assert data.preprocess.direction == tuple(space.GetDirection())
            assert len(list((tmp_path / "cache_affine").iterdir())) == 2
            again = ScanSet(cfg)  # from the cache: the same tensors
            assert all(torch.equal(x, y) for x, y in zip(data.images, again.images))
    assert prepared["affine"] > 0.9 > prepared["none"], prepared


def test_a_model_grid_with_the_model_s_axes_covers_the_reference():
    """``Preprocessing.direction``: the grid takes those axes whatever the reference's and covers its extent
    (its corner voxels), with the same centre."""
    from cyclereg.core.coords import identity_grid
    from cyclereg.io.images import Geometry
    from cyclereg.io.preprocess import Preprocessing, model_grid
    from test_physical import _oblique

    reference = blob((20, 18, 16), (1.0, 1.2, 1.4), (-10.0, -8.0, -6.0), _oblique(3, 0.5))
    prep = Preprocessing(spacing=(2.0, 2.0, 2.0), direction=tuple(np.eye(3).ravel()))
    grid = model_grid(reference, prep)
    assert grid.direction == tuple(np.eye(3).ravel())
    g = Geometry.of(reference)
    corners = g.to_physical(identity_grid((2, 2, 2), dtype=torch.float64))  # the reference's corner voxels
    inside = grid.from_physical(corners)
    half = 0.5 / (min(grid.size) - 1)  # the size is rounded to whole model voxels: within half of one
    assert float(inside.min()) >= -half and float(inside.max()) <= 1 + half
    assert float(inside.min()) < 0.1 and float(inside.max()) > 0.9  # and not much larger either
    centre = lambda geometry: geometry.to_physical(torch.full((1, 3, 1, 1, 1), 0.5, dtype=torch.float64)).flatten()  # noqa: E731
    np.testing.assert_allclose(centre(grid).numpy(), centre(g).numpy(), atol=1e-9)
