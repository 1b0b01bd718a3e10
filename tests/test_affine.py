"""Affine registration (``cyclereg affine``, ``cyclereg.registration.affine``) on small synthetic volumes:
known rotations (up to 90°), translations, scalings and shears are recovered in physical space, with
oblique and flipped image directions; an intensity-remapped copy with mutual information; the result is
never worse than where it started; bad input gets the corpus' one-line errors and writes nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from cyclereg.cli import main
from cyclereg.registration import affine as affine_module
from cyclereg.registration.affine import affine_register

TOLERANCE_MM = 1.5  # worst error over points spread through the object, on grids of 2 mm (3D) or 1 mm (2D)


def _phantom(dim: int, direction=None) -> sitk.Image:
    """Smoothed ellipsoids of several intensities, asymmetric so that no rotation maps it onto itself."""
    shape = (30, 34, 38) if dim == 3 else (60, 68)
    grids = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    blobs = [((0, 0, 0), (10, 12, 15), 1.0), ((3, -5, 6), (4, 5, 3), 2.0), ((-4, 6, -7), (3, 3, 6), 0.5),
             ((5, 5, -8), (3, 4, 2), 1.5)]
    scale = 1 if dim == 3 else 2
    image = np.zeros(shape, np.float32)
    for centre, radii, value in blobs:
        inside = sum(((g - scale * c) / (scale * r)) ** 2 for g, c, r in zip(grids, centre[:dim], radii[:dim])) < 1
        image += value * inside
    out = sitk.GetImageFromArray(image)
    out.SetSpacing([2.0] * dim if dim == 3 else [1.0] * dim)
    out.SetOrigin([-30.0, 12.0, 4.0][:dim])
    if direction is not None:
        out.SetDirection(direction)
    return sitk.SmoothingRecursiveGaussian(out, 1.5)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis is None:  # 2D
        return np.array([[c, -s], [s, c]])
    m = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _moved(fixed: sitk.Image, matrix, translation, direction=None):
    """The moving image with moving(T(x)) = fixed(x) for the true T(x) = A (x - c) + c + t, on a grid of
    its own (``direction``), and T."""
    d = fixed.GetDimension()
    true = sitk.AffineTransform(d)
    true.SetMatrix(np.asarray(matrix, float).ravel().tolist())
    true.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    true.SetTranslation(list(translation))
    reference = sitk.Image(fixed)
    if direction is not None:
        reference.SetDirection(direction)
        centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
        offset = np.array(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
        reference.SetOrigin((np.array(reference.GetOrigin()) + centre - offset).tolist())  # same centre, other axes
    moving = sitk.Resample(fixed, reference, true.GetInverse(), sitk.sitkLinear, 0.0)
    return moving, true


def _error(fixed, estimated, true) -> float:
    """Worst distance (mm) between the estimated and true maps over points spread through the object."""
    size = fixed.GetSize()
    points = [fixed.TransformContinuousIndexToPhysicalPoint([f * (n - 1) for f, n in zip(frac, size)])
              for frac in np.stack(np.meshgrid(*[[0.3, 0.5, 0.7]] * fixed.GetDimension()), -1).reshape(-1, fixed.GetDimension())]
    return max(np.linalg.norm(np.array(estimated.TransformPoint(p)) - np.array(true.TransformPoint(p))) for p in points)


OBLIQUE = _rotation(0, 20) @ _rotation(2, -15)
FLIPPED = np.diag([-1.0, 1.0, -1.0])

CASES = {
    "90 degrees about z, translated": (3, _rotation(2, 90), (6.0, -4.0, 3.0), None, None),
    "60 degrees about x, oblique fixed axes": (3, _rotation(0, 60), (-3.0, 2.0, 5.0), OBLIQUE, None),
    "scaled and sheared, flipped moving axes": (3, np.array([[1.1, 0.1, 0], [0, 0.95, 0], [0.05, 0, 1.05]]) @ _rotation(1, 25),
                                                (2.0, 3.0, -2.0), None, FLIPPED),
    "2D: 75 degrees, scaled": (2, 1.08 * _rotation(None, 75), (4.0, -3.0), None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_known_affine_map_is_recovered_in_physical_space(case):
    dim, matrix, translation, fixed_direction, moving_direction = CASES[case]
    fixed = _phantom(dim, None if fixed_direction is None else fixed_direction.ravel().tolist())
    moving, true = _moved(fixed, matrix, translation, None if moving_direction is None else moving_direction.ravel().tolist())
    result = affine_register(fixed, moving)
    assert not result.kept_start
    assert result.cost < result.cost_start
    assert _error(fixed, result.transform(), true) < TOLERANCE_MM


def test_mutual_information_aligns_an_intensity_remapped_copy():
    fixed = _phantom(3)
    moving, true = _moved(fixed, _rotation(2, 40), (3.0, 2.0, -4.0))
    # another contrast: the background stays dark, the tissues' order changes (no affine intensity map relates them)
    values = np.interp(sitk.GetArrayFromImage(moving), [0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0], [0, 0.3, 2.0, 0.7, 1.6, 1.2, 1.2])
    remapped = sitk.GetImageFromArray(values.astype(np.float32))
    remapped.CopyInformation(moving)
    result = affine_register(fixed, remapped, "mi")
    assert result.similarity == "mi" and _error(fixed, result.transform(), true) < TOLERANCE_MM


def test_it_never_ends_worse_than_it_started(monkeypatch):
    fixed = _phantom(3)
    moving, _ = _moved(fixed, _rotation(2, 30), (3.0, 0.0, 0.0))
    real = affine_module._optimise

    def astray(params, centre, f_grid, m_grid, similarity, stage, steps):
        real(params, centre, f_grid, m_grid, similarity, stage, steps)
        if stage == "affine":  # an optimiser that ends far off
            params.shift.data += 40.0

    monkeypatch.setattr(affine_module, "_optimise", astray)
    result = affine_register(fixed, moving)
    assert result.kept_start
    assert result.cost == min(result.cost_start, result.cost_identity)


def _files(tmp_path, dim=3):
    fixed = _phantom(dim)
    moving, true = _moved(fixed, _rotation(2 if dim == 3 else None, 35), (4.0, -2.0, 1.0)[:dim])
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    return tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", true


def test_the_command_writes_an_itk_transform_and_the_warped_image(tmp_path, capsys):
    fixed, moving, true = _files(tmp_path)
    code = main(["affine", "--fixed", str(fixed), "--moving", str(moving), "--transform", str(tmp_path / "a.tfm"),
                 "--warped", str(tmp_path / "w.nii.gz"), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    transform = sitk.ReadTransform(str(tmp_path / "a.tfm"))
    fixed_image = sitk.ReadImage(str(fixed))
    assert _error(fixed_image, transform, true) < TOLERANCE_MM
    expected = sitk.Resample(sitk.ReadImage(str(moving)), fixed_image, transform, sitk.sitkLinear, 0.0)
    warped = sitk.ReadImage(str(tmp_path / "w.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(expected), atol=1e-5)
    assert '"kept_start": false' in capsys.readouterr().out


def _one_line_error(err: str, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cyclereg: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_a_2d_image_against_a_3d_one_is_refused(tmp_path, capsys):
    fixed, _, _ = _files(tmp_path)
    sitk.WriteImage(_phantom(2), str(tmp_path / "flat.nii.gz"))
    out = tmp_path / "a.tfm"
    code = main(["affine", "--fixed", str(fixed), "--moving", str(tmp_path / "flat.nii.gz"), "--transform", str(out)])
    assert code == 1 and not out.exists()
    _one_line_error(capsys.readouterr().err, "flat.nii.gz is 2D but --fixed", "is 3D")


def test_an_image_without_foreground_is_refused(tmp_path, capsys):
    fixed, _, _ = _files(tmp_path)
    empty = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    out = tmp_path / "a.tfm"
    code = main(["affine", "--fixed", str(fixed), "--moving", str(tmp_path / "empty.nii.gz"), "--transform", str(out)])
    assert code == 1 and not out.exists()
    _one_line_error(capsys.readouterr().err, "empty.nii.gz has no foreground")


def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    fixed, moving, _ = _files(tmp_path)
    out = tmp_path / "a.tfm"
    assert main(["affine", "--fixed", str(fixed), "--moving", str(moving), "--transform", str(out), "--steps", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "--steps: expected at least 1, got 0")
    assert not out.exists()
    with pytest.raises(SystemExit) as stop:
        main(["affine", "--fixed", str(fixed), "--moving", str(moving), "--transform", str(out), "--similarity", "ssd"])
    assert stop.value.code == 2 and not out.exists()
