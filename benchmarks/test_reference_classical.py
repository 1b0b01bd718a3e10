"""Checks of the classical baselines in reference_classical.py (ANTs SyN, SimpleITK demons).

Not part of the main suite (that lives in tests/); it needs the separate venv
with antspyx (see benchmarks/requirements-reference.txt):

    .venv-bench/bin/python -m pytest benchmarks/test_reference_classical.py

Synthetic data: a sum of smooth Gaussian blobs, evaluated analytically at the
physical points of a 32x36x40 grid with spacing (1.5, 1.2, 1.0) and a
non-zero origin; the moving image is the same content shifted by +2 mm along
physical x.  Then moving(x + (2, 0, 0)) = fixed(x), so the ITK-convention
displacement is d(x) = (+2, 0, 0) everywhere the content is.

ITK (inside ANTs and SimpleITK) is held to one thread unless
ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (or CYCLEREG_TEST_THREADS) says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", os.environ.get("CYCLEREG_TEST_THREADS", "1"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

sitk = pytest.importorskip("SimpleITK")
ants = pytest.importorskip("ants", reason="antspyx lives in the separate .venv-bench")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_classical as rc  # noqa: E402

SIZE = (32, 36, 40)  # SimpleITK order (x, y, z)
SPACING = (1.5, 1.2, 1.0)
ORIGIN = (-10.0, 5.0, 3.0)
SHIFT_MM = np.array([2.0, 0.0, 0.0])
# Centre of the content in physical space (the grid centre for the identity direction).
CENTRE = np.array(ORIGIN) + (np.array(SIZE) - 1) / 2 * np.array(SPACING)
BLOBS = [  # (offset from CENTRE in mm, sigma in mm, amplitude)
    ((0.0, 0.0, 0.0), 9.0, 1.0),
    ((8.0, -6.0, 4.0), 5.0, 0.8),
    ((-9.0, 7.0, -5.0), 4.0, 0.6),
    ((5.0, 8.0, -8.0), 3.0, 0.9),
]
# Fast settings: the conventions do not depend on how long SyN runs.  The metric is
# the default (CC, radius 2); full-resolution CC iterations dominate the run time.
SYN_FAST = dict(reg_iterations=(40, 20, 5))
BORDER = 4  # voxels ignored at each face when comparing resampled images


def reference_grid(direction=np.eye(3)) -> sitk.Image:
    """Empty float32 image: SIZE, SPACING, and an origin that puts CENTRE at the grid centre."""
    direction = np.asarray(direction, dtype=float)
    img = sitk.Image(SIZE, sitk.sitkFloat32)
    img.SetSpacing(SPACING)
    img.SetDirection(direction.ravel().tolist())
    origin = CENTRE - direction @ np.diag(SPACING) @ ((np.array(SIZE) - 1) / 2)
    img.SetOrigin(origin.tolist())
    return img


def physical_points(ref: sitk.Image) -> np.ndarray:
    """Physical point of every voxel, array shape (z, y, x, 3) like GetArrayFromImage."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in ref.GetSize()], indexing="ij"), -1)
    matrix = np.asarray(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
    pts = idx @ matrix.T + np.asarray(ref.GetOrigin())
    return pts.transpose(2, 1, 0, 3)


def blob_image(ref: sitk.Image, shift=(0.0, 0.0, 0.0)) -> sitk.Image:
    """The blob content moved by ``shift`` mm: image(p) = content(p - shift)."""
    pts = physical_points(ref) - np.asarray(shift)
    values = np.zeros(pts.shape[:-1])
    for offset, sigma, amplitude in BLOBS:
        centre = CENTRE + np.asarray(offset)
        values += amplitude * np.exp(-((pts - centre) ** 2).sum(-1) / (2 * sigma**2))
    img = sitk.GetImageFromArray(values.astype(np.float32))
    img.CopyInformation(ref)
    return img


def array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def warp(moving: sitk.Image, fixed: sitk.Image, field: sitk.Image) -> sitk.Image:
    # DisplacementFieldTransform takes over the image it is given: hand it a copy.
    return sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Image(field)))


def mse(a: sitk.Image, b: sitk.Image) -> float:
    return float(np.mean((array(a).astype(float) - array(b).astype(float)) ** 2))


def inner(a: np.ndarray) -> np.ndarray:
    return a[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER]


def centre_displacement(field: sitk.Image) -> np.ndarray:
    """Mean displacement over the central 6x6x6 voxels."""
    d = array(field)
    cz, cy, cx = (s // 2 for s in d.shape[:3])
    return d[cz - 3 : cz + 3, cy - 3 : cy + 3, cx - 3 : cx + 3].reshape(-1, 3).mean(0)


def assert_on_fixed_grid(field: sitk.Image, fixed: sitk.Image) -> None:
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetDimension() == 3 and field.GetNumberOfComponentsPerPixel() == 3
    assert field.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(field.GetSpacing(), fixed.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), rtol=0, atol=1e-12)


# Flipped x and y: what an RAS-stored NIfTI brain looks like in ITK's LPS space.
FLIPPED = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def shift_pair():
    ref = reference_grid()
    return blob_image(ref), blob_image(ref, SHIFT_MM)


@pytest.fixture(scope="module")
def flipped_pair():
    ref = reference_grid(FLIPPED)
    return blob_image(ref), blob_image(ref, SHIFT_MM)


@pytest.fixture(scope="module")
def syn_result(shift_pair):
    fixed, moving = shift_pair
    return rc.syn_register(fixed, moving, **SYN_FAST)


@pytest.fixture(scope="module")
def demons_result(shift_pair):
    fixed, moving = shift_pair
    return rc.demons_register(fixed, moving)


@pytest.fixture(params=["syn", "demons"])
def result(request, syn_result, demons_result):
    return {"syn": syn_result, "demons": demons_result}[request.param]


def test_synthetic_pair_is_what_the_tests_assume(shift_pair):
    fixed, moving = shift_pair
    assert fixed.GetSize() == SIZE and fixed.GetSpacing() == SPACING
    np.testing.assert_allclose(fixed.GetOrigin(), ORIGIN, atol=1e-12)
    # Moving really is fixed shifted by +2 mm in x: sampling moving at x + (2, 0, 0) gives fixed.
    back = sitk.Resample(moving, fixed, sitk.TranslationTransform(3, SHIFT_MM.tolist()), sitk.sitkBSpline)
    assert np.abs(inner(array(back) - array(fixed))).max() < 2e-3
    assert mse(fixed, moving) > 1e-3


def test_field_is_on_fixed_grid(shift_pair, result):
    fixed, _ = shift_pair
    field, seconds = result
    assert_on_fixed_grid(field, fixed)
    assert isinstance(seconds, float) and seconds > 0


def test_field_reduces_mismatch(shift_pair, result):
    fixed, moving = shift_pair
    field, _ = result
    before = mse(fixed, moving)
    after = mse(fixed, warp(moving, fixed, field))
    assert after < before / 10, (before, after)


def test_shift_is_recovered_with_the_right_sign(result):
    field, _ = result
    d = centre_displacement(field)
    assert abs(d[0] - 2.0) < 0.4, d
    assert np.all(np.abs(d[1:]) < 0.3), d


def _compare_with_ants(fixed, moving, tmp_path, type_of_transform, min_gain=10.0, **kw):
    result, seconds = rc.run_ants_registration(
        fixed, moving, str(tmp_path / "reg_"), type_of_transform=type_of_transform, **kw
    )
    fwd = result["fwdtransforms"]
    field = rc.ants_transforms_to_field(fwd, fixed)
    assert_on_fixed_grid(field, fixed)

    ours = array(warp(moving, fixed, field))
    by_ants = array(rc.ants_to_sitk(ants.apply_transforms(rc.sitk_to_ants(fixed), rc.sitk_to_ants(moving), fwd)))
    warpedmovout = array(rc.ants_to_sitk(result["warpedmovout"]))
    value_range = float(array(fixed).max() - array(fixed).min())
    assert np.abs(inner(ours - by_ants)).max() < 1e-3 * value_range
    assert np.abs(inner(ours - warpedmovout)).max() < 1e-3 * value_range
    # and the registration did something, so the agreement is not trivial
    assert mse(fixed, warp(moving, fixed, field)) < mse(fixed, moving) / min_gain
    return fwd, field


def test_syn_field_matches_ants_apply_transforms(shift_pair, tmp_path):
    fixed, moving = shift_pair
    fwd, _ = _compare_with_ants(fixed, moving, tmp_path, "SyNOnly", reg_iterations=(20, 10))
    # SyNOnly: the warp, then the identity affine ANTs writes for "-r Identity".
    assert fwd[0].endswith("Warp.nii.gz") and fwd[-1].endswith("GenericAffine.mat")


def test_syn_with_affine_stage_composes_in_ants_order(flipped_pair, tmp_path):
    """type_of_transform="SyN": [Warp, Affine], with a non-trivial affine and a flipped direction.

    Composing the two in the wrong order gives intensity errors of a few per cent here.
    """
    fixed, moving = flipped_pair
    fwd, field = _compare_with_ants(
        fixed, moving, tmp_path, "SyN", min_gain=3.0, syn_metric="meansquares", reg_iterations=(20, 10)
    )
    assert len(fwd) == 2 and fwd[0].endswith("Warp.nii.gz") and fwd[1].endswith("GenericAffine.mat")
    affine = sitk.ReadTransform(fwd[1])
    assert not np.allclose(affine.GetParameters(), sitk.AffineTransform(3).GetParameters(), atol=1e-3)
    d = centre_displacement(field)
    assert abs(d[0] - 2.0) < 0.5 and np.all(np.abs(d[1:]) < 0.5), d


def test_demons_with_flipped_direction(flipped_pair):
    fixed, moving = flipped_pair
    field, _ = rc.demons_register(fixed, moving)
    assert_on_fixed_grid(field, fixed)
    assert mse(fixed, warp(moving, fixed, field)) < mse(fixed, moving) / 10
    d = centre_displacement(field)
    assert abs(d[0] - 2.0) < 0.4 and np.all(np.abs(d[1:]) < 0.3), d


def test_demons_options(shift_pair):
    fixed, moving = shift_pair
    # last level not at full resolution: the field is interpolated onto the fixed grid
    field, _ = rc.demons_register(
        fixed, moving, iterations=(30, 20), smoothing=2.0, shrink_factors=(4, 2), maximum_update_step_length=1.0
    )
    assert_on_fixed_grid(field, fixed)
    assert mse(fixed, warp(moving, fixed, field)) < mse(fixed, moving) / 5
    with pytest.raises(TypeError):
        rc.demons_register(fixed, moving, no_such_setting=1)
    with pytest.raises(ValueError):
        rc.demons_register(fixed, moving, iterations=(10, 10), shrink_factors=(4, 2, 1))
