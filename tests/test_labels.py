"""Label supervision (``model.label_weight``, ``data.label_list``): the term on stand-in maps whose effect
on the labels is known, the label maps carried through data, augmentation and batches, and training with it."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cyclereg.core.config import config_from_dict
from cyclereg.core.errors import DataError, UsageError
from cyclereg.data.augment import AugmentSettings, augment_pair
from cyclereg.data.volumes import ScanSet
from cyclereg.losses.labels import dice_loss, label_indices, one_hot
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.training.train import train

from test_physical import blob
from cyclereg.models.registration import CycleMorph

from test_wiring import Constant, Fixed, _translation

SHAPE = (12, 12, 12)


def _cubes(shifts, shape=SHAPE) -> torch.Tensor:
    """``(n, 1, *shape)`` label indices: two cubes (labels 1 and 2) moved by ``shifts`` voxels (along axis 0)."""
    out = torch.zeros(len(shifts), 1, *shape, dtype=torch.uint8)
    for i, s in enumerate(shifts):
        out[i, 0, 2 + s:6 + s, 2:6, 2:6] = 1
        out[i, 0, 4 + s:8 + s, 6:10, 5:9] = 2
    return out


def _labelled_pair(shift: int):
    """Images and one-hot labels of a pair whose moving image is the fixed one shifted by ``shift`` voxels."""
    fixed_labels, moving_labels = one_hot(_cubes([0]), 2, torch.float64), one_hot(_cubes([shift]), 2, torch.float64)
    return moving_labels.sum(1, keepdim=True), fixed_labels.sum(1, keepdim=True), (moving_labels, fixed_labels)


def _settings(method: str, weight: float = 1.0) -> LossSettings:
    return LossSettings(method=method, similarity="mse", lam=0.0, label_weight=weight)


def test_dice_loss_is_zero_for_identical_maps_and_one_for_disjoint():
    labels = one_hot(_cubes([0, 1]), 2)
    assert torch.allclose(dice_loss(labels, labels), torch.zeros(2), atol=1e-6)
    far = one_hot(torch.roll(_cubes([0]), 6, dims=3), 2)
    assert float(dice_loss(far, labels[:1])) == pytest.approx(1.0)
    # a label absent from both maps does not count: one label of two matched exactly gives 0
    only_first = labels[:1].clone()
    only_first[:, 1] = 0
    assert float(dice_loss(only_first, only_first)) == pytest.approx(0.0, abs=1e-6)


def test_label_indices_follow_the_list_and_drop_other_values():
    values = torch.tensor([0, 17, 53, 4, 53])
    assert label_indices(values, [53, 17]).tolist() == [0, 2, 1, 0, 1]


@pytest.mark.parametrize("method", ["icon", "gradicon", "diffusion"])
def test_label_term_zero_for_identical_labels_under_the_identity(method):
    moving, fixed, labels = _labelled_pair(0)
    zero = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    model = Fixed(moving, fixed, zero, zero)
    total, terms = loss_terms(model, moving, fixed, _settings(method), labels)
    assert float(terms["labels"]) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["icon", "gradicon", "diffusion"])
def test_label_term_falls_to_zero_when_the_known_shift_is_undone(method):
    """The moving labels are the fixed ones shifted by 2 voxels; the map that undoes the shift (and its
    inverse for B→A) brings the term to 0, and the label weight scales what it adds to the total."""
    moving, fixed, labels = _labelled_pair(2)
    zero = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    undo, redo = _translation(SHAPE, [2, 0, 0]), _translation(SHAPE, [-2, 0, 0])
    before = loss_terms(Fixed(moving, fixed, zero, zero), moving, fixed, _settings(method), labels)[1]["labels"]
    total, terms = loss_terms(Fixed(moving, fixed, undo, redo), moving, fixed, _settings(method), labels)
    assert float(before) > 0.4 and float(terms["labels"]) == pytest.approx(0.0, abs=1e-9)
    weighted, _ = loss_terms(Fixed(moving, fixed, zero, zero), moving, fixed, _settings(method, 3.0), labels)
    plain, _ = loss_terms(Fixed(moving, fixed, zero, zero), moving, fixed, _settings(method, 0.0), labels)
    assert float(weighted - plain) == pytest.approx(3 * float(before))


@pytest.mark.parametrize("method", ["icon", "gradicon"])
def test_label_term_uses_each_directions_own_map(method):
    """Symmetric methods score A→B with Φ_AB and B→A with Φ_BA: swapping the two maps (the moving labels
    warped by the map of the other direction) leaves a large term."""
    moving, fixed, labels = _labelled_pair(2)
    undo, redo = _translation(SHAPE, [2, 0, 0]), _translation(SHAPE, [-2, 0, 0])
    swapped = loss_terms(Fixed(moving, fixed, redo, undo), moving, fixed, _settings(method), labels)[1]["labels"]
    assert float(swapped) > 1.0  # both directions far off (their sum)


def test_cyclemorph_label_term_uses_g_ab_for_the_moving_labels():
    moving, fixed, labels = _labelled_pair(2)
    undo, redo = _translation(SHAPE, [2, 0, 0]), _translation(SHAPE, [-2, 0, 0])
    settings = LossSettings(method="cyclemorph", similarity="mse", lam=0.0, alpha=0.0, beta=0.0, label_weight=1.0)
    right = loss_terms(CycleMorph(Constant(undo), Constant(redo)), moving, fixed, settings, labels)[1]["labels"]
    wrong = loss_terms(CycleMorph(Constant(redo), Constant(undo)), moving, fixed, settings, labels)[1]["labels"]
    assert float(right) == pytest.approx(0.0, abs=1e-9) and float(wrong) > 1.0


def test_pairs_without_labels_are_left_out_of_the_term():
    moving, fixed, (ml, fl) = _labelled_pair(2)
    moving, fixed = torch.cat([moving, moving]), torch.cat([fixed, fixed])
    ml, fl = torch.cat([ml, torch.zeros_like(ml)]), torch.cat([fl, fl])  # the second pair's moving scan has none
    zero = torch.zeros(2, 3, *SHAPE, dtype=torch.float64)
    undo = torch.cat([_translation(SHAPE, [2, 0, 0]), zero[:1]])
    redo = torch.cat([_translation(SHAPE, [-2, 0, 0]), zero[:1]])
    terms = loss_terms(Fixed(moving, fixed, undo, redo), moving, fixed, _settings("gradicon"), (ml, fl))[1]
    assert float(terms["labels"]) == pytest.approx(0.0, abs=1e-9)
    none = loss_terms(Fixed(moving, fixed, undo, redo), moving, fixed, _settings("gradicon"),
                      (torch.zeros_like(ml), fl))[1]
    assert float(none["labels"]) == 0.0


def test_augmentation_moves_labels_with_their_image():
    """The label map of an image thresholded into labels, augmented with it, is the augmented image
    thresholded (up to voxels on the boundary), and the images are those augmented without labels."""
    image = torch.from_numpy(sitk.GetArrayFromImage(blob((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), seed=3))
                             .astype(np.float32))[None, None]
    image = image / image.max()
    labels = (image > 0.4).to(torch.uint8)
    settings = AugmentSettings(deform=2.0, smoothness=3, affine=0.1, flips=True)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    m, f, _, (ml, fl) = augment_pair(image, image.clone(), settings, g(), (labels, labels.clone()))
    plain_m, plain_f, _ = augment_pair(image, image.clone(), settings, g())
    assert torch.equal(m, plain_m) and torch.equal(f, plain_f)
    assert ml.dtype == torch.uint8 and not torch.equal(ml, fl)
    for warped, lab in ((m, ml), (f, fl)):
        agree = ((warped > 0.4).to(torch.uint8) == lab).float().mean()
        assert float(agree) > 0.97


def _labelled_scans(root, n=4):
    rows = []
    for seed in range(n):
        image = blob((18, 16, 14), (1.2, 1.2, 1.2), (-10.0, -8.0, -6.0), seed=seed)
        sitk.WriteImage(image, str(root / f"s{seed}.nii.gz"))
        cell = ""
        if seed % 2 == 0:  # every other scan has labels, stored on a grid of its own (2 mm)
            labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 60).astype(np.int16) * 17)
            labels.CopyInformation(image)
            coarse = sitk.Resample(labels, [9, 8, 7], sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(),
                                   (2.4, 2.4, 2.4), image.GetDirection(), 0, sitk.sitkInt16)
            sitk.WriteImage(coarse, str(root / f"s{seed}_labels.nii.gz"))
            cell = f"s{seed}_labels.nii.gz"
        rows.append({"image": f"s{seed}.nii.gz", "labels": cell})
    with (root / "scans.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "scans.csv"


def _config(csv_path, out=None, **model):
    raw = {"data": {"dataset": "folder", "root": str(csv_path), "spacing": [2.0, 2.0, 2.0], "pad_multiple": 4,
                    "deform": 1.0, "smoothness": 3, "val_pairs": 1, "holdout": 0.25, "label_list": [17]},
           "model": {"method": "gradicon", "similarity": "lncc", "lam": 0.5, "label_weight": 1.0,
                     "steps": [{"network": "unet", "params": {"channels": [4, 8]}}], **model},
           "train": {"steps": 4, "batch_size": 2, "log_every": 1, "val_every": 1000, "checkpoint_every": 2, "workers": 0}}
    return config_from_dict(raw)


def test_scan_set_carries_label_maps_resampled_onto_the_model_grid(tmp_path):
    data = ScanSet(_config(_labelled_scans(tmp_path)).data)
    assert len(data.images) == 3 and len(data.labels) == 3  # the fourth scan is held out
    assert [bool(lab.any()) for lab in data.labels] == [True, False, True]
    first = data.labels[0]
    assert first.shape == data.images[0].shape and first.dtype == torch.uint8 and set(first.unique().tolist()) == {0, 1}
    # the labels lie on their scan: the labelled voxels are the bright ones
    image = data.images[0]
    assert float(image[first == 1].mean()) > float(image[first == 0].mean()) + 0.3
    batch = data.pair(torch.Generator().manual_seed(0))
    assert len(batch) == 4 and all(part.shape == first.shape for part in batch)


def test_label_list_needs_labelled_training_scans_and_a_folder_dataset(tmp_path):
    csv_path = _labelled_scans(tmp_path)
    rows = csv_path.read_text().splitlines()
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join(["image"] + [r.split(",")[0] for r in rows[1:]]) + "\n")
    with pytest.raises(DataError, match="no training scan of data.root .* has a label map"):
        ScanSet(_config(bare).data)
    with pytest.raises(UsageError, match="data.label_list"):
        config_from_dict({"data": {"dataset": "folder", "root": "x.csv"}, "model": {"label_weight": 1.0}})
    with pytest.raises(UsageError, match="model.label_weight"):
        config_from_dict({"model": {"label_weight": 1.0}, "data": {"label_list": [1]}})


def test_training_with_labels_logs_the_term_and_lowers_it(tmp_path):
    """A short run with label supervision logs the label term; a longer one on the same data lowers it."""
    cfg = _config(_labelled_scans(tmp_path))
    cfg.train.steps, cfg.train.lr = 30, 3e-3
    train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    values = [line["labels"] for line in lines if "labels" in line and line["labels"] > 0]
    assert len(values) >= 5
    assert np.mean(values[-5:]) < np.mean(values[:5])


def test_label_pairs_draws_that_share_among_the_labelled_scans(tmp_path):
    csv_path = _labelled_scans(tmp_path, n=6)  # scans 0, 2, 4 labelled; 5 held out
    cfg = _config(csv_path).data
    cfg.holdout = 0.2
    plain, labelled = ScanSet(cfg), ScanSet(dataclasses.replace(cfg, label_pairs=1.0))
    both = lambda data, seed: all(bool(part.any()) for part in data.pair(torch.Generator().manual_seed(seed))[2:])  # noqa: E731
    assert all(both(labelled, seed) for seed in range(20))
    assert not all(both(plain, seed) for seed in range(20))
