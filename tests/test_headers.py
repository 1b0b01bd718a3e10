"""NIfTI headers that scanners and converters get wrong, and orientations that differ between files: read
as ITK reads them, with a warning where the two frames of a header disagree, refused where no frame is
usable, and registered correctly across handedness."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cyclereg.cli import main
from cyclereg.io.images import read_image

from test_affine import _phantom


def _nifti(path, data, sform=None, qform=None):
    image = nib.Nifti1Image(data.astype(np.float32), np.eye(4))
    image.set_sform(np.eye(4) if sform is None else sform, code=0 if sform is None else 1)
    image.set_qform(np.eye(4) if qform is None else qform, code=0 if qform is None else 1)
    nib.save(image, str(path))
    return path


def _affine(origin, linear=np.eye(3)):
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = linear, origin
    return out


DATA = np.random.default_rng(0).random((10, 12, 14))


def test_sform_and_qform_that_disagree_use_the_sform_and_warn(tmp_path, capsys):
    path = _nifti(tmp_path / "a.nii.gz", DATA, sform=_affine([10.0, 20.0, 30.0]), qform=_affine([-5.0, 0.0, 0.0]))
    image = read_image(path, "--moving")
    assert image.GetOrigin() == (-10.0, -20.0, 30.0)  # the sform, in ITK's LPS
    assert capsys.readouterr().err == (f"cyclereg: warning: --moving {path}: its sform and qform disagree (by up to 30 mm "
                                       "at its corners); the sform is used, as ITK and nibabel do\n")
    agree = _nifti(tmp_path / "b.nii.gz", DATA, sform=_affine([10.0, 20.0, 30.0]), qform=_affine([10.0, 20.0, 30.0]))
    read_image(agree, "--moving")
    assert capsys.readouterr().err == ""


def test_a_sheared_sform_gives_way_to_the_qform_or_is_refused(tmp_path, capsys):
    shear = _affine([1.0, 2.0, 3.0], np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    with_qform = _nifti(tmp_path / "q.nii.gz", DATA, sform=shear, qform=_affine([4.0, 5.0, 6.0]))
    assert read_image(with_qform, "--fixed").GetOrigin() == (-4.0, -5.0, 6.0)
    assert "its sform has shear or axes that are not orthonormal; the qform is used" in capsys.readouterr().err
    alone = _nifti(tmp_path / "s.nii.gz", DATA, sform=shear)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["affine", "--fixed", str(alone), "--moving", str(with_qform), "--transform", str(out / "t.tfm")])
    assert code == 1 and not list(out.iterdir())
    err = capsys.readouterr().err
    assert err.endswith(f"cyclereg: error: --fixed {alone} has a direction matrix with shear or axes that are not orthonormal "
                        "(its sform; no qform); cyclereg, like ITK, needs orthonormal axes: resample the image onto a regular grid\n")
    assert "Traceback" not in err


@pytest.mark.parametrize("affine", ["none", "auto"])
def test_the_same_scan_in_two_orientations_registers_to_the_identity(tmp_path, capsys, affine):
    """LPS against LAS (one index axis reversed, the direction flipped with it: the same physical image of
    opposite index handedness): an identity model, with or without the affine stage, maps every voxel to
    its own physical point, with det J = 1 (no fold from the flip)."""
    from conftest import random_two_step_model, tiny_config_dict
    from cyclereg.core.config import config_from_dict
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.models.modelfile import ModelInfo, save_model

    scan = _phantom(3)
    flipped = sitk.Flip(scan, [False, True, False])  # ITK keeps the physical image: origin and direction follow
    assert np.linalg.det(np.reshape(flipped.GetDirection(), (3, 3))) < 0 < np.linalg.det(np.reshape(scan.GetDirection(), (3, 3)))
    sitk.WriteImage(scan, str(tmp_path / "lps.nii.gz"))
    sitk.WriteImage(flipped, str(tmp_path / "las.nii.gz"))
    steps = [{"network": "unet", "downsample": 2, "params": {"channels": [8, 16]}}, {"network": "unet", "params": {"channels": [8, 16]}}]
    info = ModelInfo(config_from_dict(tiny_config_dict(model__steps=steps)), (16, 16, 16), Preprocessing(spacing=(4.0,) * 3))
    save_model(tmp_path / "m.safetensors", random_two_step_model(3, (16, 16, 16), std=0.0), info)
    code = main(["register", "--model", str(tmp_path / "m.safetensors"), "--fixed", str(tmp_path / "lps.nii.gz"),
                 "--moving", str(tmp_path / "las.nii.gz"), "--transform", str(tmp_path / "t.nii.gz"),
                 "--jacobian", str(tmp_path / "j.nii.gz"), "--affine", affine, "--device", "cpu"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["folds"] == 0
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "t.nii.gz")))
    inside = sitk.GetArrayFromImage(scan) > 0.1
    assert np.linalg.norm(field, axis=-1)[inside].max() < 0.5  # mm, at voxels of the object
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "j.nii.gz")))[inside], 1.0, atol=0.02)


@pytest.mark.parametrize("size, spacing", [((40, 36, 2), (0.5, 0.5, 6.0)), ((30, 28, 12), (0.5, 0.5, 6.0))],
                         ids=["slab of 2 slices", "anisotropic"])
def test_anisotropic_voxels_and_thin_slabs_register(tmp_path, capsys, size, spacing):
    """0.5 x 0.5 x 6 mm voxels, in a slab of 2 slices and in a thicker volume: the affine stage and the model
    run, and a scan registered to a copy of itself moved by 2 mm in-plane maps every voxel of the object
    to within a voxel of its true point."""
    from conftest import random_two_step_model, tiny_config_dict
    from cyclereg.core.config import config_from_dict
    from cyclereg.io.preprocess import Preprocessing
    from cyclereg.models.modelfile import ModelInfo, save_model
    from test_physical import blob

    fixed = blob(size, spacing, (-10.0, -9.0, -6.0), seed=4)
    moving = sitk.Image(fixed)
    moving.SetOrigin(tuple(np.asarray(fixed.GetOrigin()) + [2.0, 0.0, 0.0]))  # moving(x + 2) = fixed(x)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    steps = [{"network": "unet", "downsample": 2, "params": {"channels": [8, 16]}}, {"network": "unet", "params": {"channels": [8, 16]}}]
    info = ModelInfo(config_from_dict(tiny_config_dict(model__steps=steps)), (16, 16, 8), Preprocessing(spacing=(1.0, 1.0, 3.0)))
    save_model(tmp_path / "model.safetensors", random_two_step_model(3, (8, 16, 16), std=0.0), info)
    code = main(["register", "--model", str(tmp_path / "model.safetensors"), "--fixed", str(tmp_path / "f.nii.gz"),
                 "--moving", str(tmp_path / "m.nii.gz"), "--transform", str(tmp_path / "t.nii.gz"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "t.nii.gz")))
    inside = sitk.GetArrayFromImage(fixed) > 0.5 * sitk.GetArrayFromImage(fixed).max()
    error = np.linalg.norm(field - np.array([2.0, 0.0, 0.0]), axis=-1)[inside]
    assert np.median(error) < 0.5 and error.max() < 2.0, (np.median(error), error.max())
