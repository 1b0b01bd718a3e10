"""Tests on the real images in ../shared/data. Run by .ci/run with ``-m shared_data``; they fail
(never skip) when the folder is missing."""

from pathlib import Path

import pytest
import torch

from cyclereg.core.config import load_config
from cyclereg.data.datasets import dataset_images, load_mnist
from cyclereg.evaluation.scores import score_pairs, summarise
from cyclereg.models.registration import build_model

pytestmark = pytest.mark.shared_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST = SHARED / "mnist"


def _need(path: Path) -> Path:
    assert path.exists(), f"shared data missing: {path} (these tests need ../shared/data beside the project)"
    return path


def test_mnist_fives_are_read_from_the_real_idx_files():
    fives = load_mnist(_need(MNIST), "train", 5)
    assert fives.shape == (663, 1, 28, 28)
    assert fives.dtype == torch.float32 and 0 <= float(fives.min()) and float(fives.max()) <= 1
    every = load_mnist(MNIST, "train", None)
    assert every.shape[0] == 9800


def test_mnist_recipe_holds_out_images_never_trained_on():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "mnist5.toml", [f"data.root={_need(MNIST)}"])
    train, held = dataset_images(cfg.data, "train"), dataset_images(cfg.data, "heldout")
    assert len(train) + len(held) == 663
    # no held-out image appears in the training set
    diffs = (train[:, None] - held[None]).abs().flatten(2).amax(2)
    assert bool((diffs > 0).all())


def test_identity_model_scores_real_digits():
    fives = load_mnist(_need(MNIST), "train", 5)
    model = build_model([{"network": "unet"}], 2, (28, 28))
    scores = summarise(score_pairs(model, fives[:8], fives[:8]), (28, 28))
    assert scores["dice"] == pytest.approx(1.0)
    assert scores["folds"] == 0


BRAIN = SHARED / "brain"


def test_brain_recipe_prepares_the_real_scan_on_its_model_grid():
    """configs/brain3d.toml on the real scan: a 2 mm model grid of 80x96x112, intensities in [0, 1]."""
    from cyclereg.data.volumes import ScanSet

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "brain3d.toml", [f"data.root={_need(BRAIN)}"])
    data = ScanSet(cfg.data)
    assert data.shape == (112, 96, 80) and len(data.images) == 1 and data.images[0].shape == (1, 1, 112, 96, 80)
    assert 0 <= float(data.images[0].min()) and float(data.images[0].max()) <= 1 + 1e-6
    moving, fixed = data.pair(torch.Generator().manual_seed(0))
    assert moving.shape == fixed.shape == (1, 1, 112, 96, 80) and not torch.equal(moving, fixed)


def test_real_brain_labels_survive_registration_with_their_values(tmp_path):
    """An untrained (identity) 3D model registers the real scan to itself: the warped segmentation
    is the segmentation, every label kept, in its own pixel type."""
    import SimpleITK as sitk

    from cyclereg.models.modelfile import ModelInfo, build_from_info
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.registration.register import register_files

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "brain3d.toml", [f"data.root={_need(BRAIN)}"])
    info = ModelInfo(cfg, (112, 96, 80), Preprocessing("percentile", spacing=(2.0, 2.0, 2.0), pad_multiple=16))
    model = build_from_info(info).eval()
    t1, aseg = BRAIN / "subject_a_t1.nii.gz", BRAIN / "subject_a_aseg.nii.gz"
    summary = register_files(model, info, t1, t1, moving_labels=aseg, warped_labels=tmp_path / "w.nii.gz")
    assert summary["folds"] == 0
    warped, original = sitk.ReadImage(str(tmp_path / "w.nii.gz")), sitk.ReadImage(str(aseg))
    assert warped.GetPixelID() == original.GetPixelID()
    assert (sitk.GetArrayFromImage(warped) == sitk.GetArrayFromImage(original)).all()


def test_two_real_brains_of_different_people_register_without_a_network(tmp_path, capsys):
    """fs02 to fs01 (held out of all training), each in its own scanner space, with no model: the affine
    stage, then the map optimised on the pair. Dice over brain/eval_labels.txt beats the affine stage's by
    far (measured: 0.682 -> 0.777) with almost no folds."""
    import json

    import numpy as np
    import SimpleITK as sitk

    from cyclereg.cli import main

    brains = _need(SHARED / "brains")
    labels = [int(v) for v in (BRAIN / "eval_labels.txt").read_text().split()]
    fixed_aseg = sitk.GetArrayFromImage(sitk.ReadImage(str(brains / "fs01_aseg.nii.gz")))

    def dice(path):
        warped = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        return np.mean([2 * np.sum((warped == v) & (fixed_aseg == v)) / (np.sum(warped == v) + np.sum(fixed_aseg == v))
                        for v in labels if (fixed_aseg == v).any()])

    common = ["--fixed", str(brains / "fs01_t1.nii.gz"), "--moving", str(brains / "fs02_t1.nii.gz")]
    assert main(["affine", *common, "--transform", str(tmp_path / "a.tfm")]) == 0
    assert main(["warp", "--transform", str(tmp_path / "a.tfm"), "--moving", str(brains / "fs02_aseg.nii.gz"),
                 "--fixed", str(brains / "fs01_t1.nii.gz"), "--out", str(tmp_path / "affine_aseg.nii.gz"), "--nearest"]) == 0
    capsys.readouterr()
    assert main(["register", "--model", "none", *common, "--moving-labels", str(brains / "fs02_aseg.nii.gz"),
                 "--warped-labels", str(tmp_path / "aseg.nii.gz"), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    affine, deformable = dice(tmp_path / "affine_aseg.nii.gz"), dice(tmp_path / "aseg.nii.gz")
    assert affine > 0.6 and deformable > affine + 0.05, (affine, deformable)
    assert summary["folded_percent"] < 0.05
