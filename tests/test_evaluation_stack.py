"""One evaluation stack: ``evaluate --dataset`` (tensors, 1 mm voxels) and ``evaluate --pairs-csv`` (files
in physical space) give every DESIGN.md key the same meaning, so the same pair scores the same."""

from __future__ import annotations

import SimpleITK as sitk
import torch

from cyclereg.core.config import config_from_dict
from cyclereg.evaluation.scores import score_pairs, summarise
from cyclereg.evaluation.files import evaluate_csv
from cyclereg.core.metrics import count_folds
from cyclereg.models.modelfile import ModelInfo
from cyclereg.io.preprocess import Preprocessing

from conftest import random_two_step_model, smooth_image, tiny_config_dict


def _write(path, tensor):
    image = sitk.GetImageFromArray(tensor[0, 0].numpy().astype("float32"))
    sitk.WriteImage(image, str(path))


def test_dataset_and_files_score_the_same_pair_alike(tmp_path, dim):
    shape = (20, 18) if dim == 2 else (12, 10, 9)
    model = random_two_step_model(dim, shape, std=0.2)
    cfg = config_from_dict(tiny_config_dict())
    info = ModelInfo(cfg, shape, Preprocessing(range=(-1.0, 1.0), pad_multiple=1))
    moving, fixed = smooth_image(shape, 1, seed=1), smooth_image(shape, 1, seed=2)
    moving, fixed = [2 * (x - x.min()) / (x.max() - x.min()) - 1 for x in (moving, fixed)]  # already in [-1, 1]
    _write(tmp_path / "m.mha", moving)
    _write(tmp_path / "f.mha", fixed)
    (tmp_path / "pairs.csv").write_text("fixed,moving\nf.mha,m.mha\n")

    dataset = summarise(score_pairs(model, moving, fixed), shape)
    files = evaluate_csv(model, info, tmp_path / "pairs.csv", progress=False, affine="none")  # the dataset has none
    assert dataset["folds"] > 0  # the random model folds: the counts are not trivially equal
    for key in ("n_pairs", "folds", "folds_percent", "ic_error_unit"):
        assert dataset[key] == files[key], key
    assert abs(dataset["ic_error"] - files["ic_error"]) < 1e-3 * dataset["ic_error"]
    # Dice agrees only where the map stays inside the moving image: outside it, files are sampled as 0
    # (as ITK does), dataset tensors at the border value (as the ICON authors do); docs/metrics.md.


def test_a_collapsed_cell_is_a_fold(dim):
    """det J = 0 exactly (two neighbouring grid points mapped to one) counts as a fold."""
    from cyclereg.core.coords import identity_grid

    shape = (6, 5) if dim == 2 else (5, 4, 3)
    points = identity_grid(shape, dtype=torch.float64).clone()
    points[:, 0, 2] = points[:, 0, 1]  # rows 1 and 2 land on one row
    cells = 1
    for n in shape[1:]:
        cells *= n - 1
    assert int(count_folds(points)) == cells  # the cells between the two rows, and no others
