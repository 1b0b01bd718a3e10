"""Tests on the real images in ../shared/data. Run by .ci/run with ``-m shared_data``; they fail
(never skip) when the folder is missing."""

from pathlib import Path

import pytest
import torch

from cyclereg.config import load_config
from cyclereg.data import dataset_images, load_mnist
from cyclereg.evaluate import score_pairs, summarise
from cyclereg.methods import build_model

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
