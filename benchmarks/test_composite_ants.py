"""ANTs applies cyclereg's transforms as cyclereg warps: ``antsApplyTransforms`` (through antspyx's
``apply_transforms``) on the composite ``.h5`` (affine + displacement field) of ``register --transform``,
and on the ``.nii.gz`` displacement field with the affine folded in, gives cyclereg's own warped image
to within 1e-3 of the intensity range, in 3D with oblique directions and an affine with shear.

Not part of the main suite (antspyx is not a cyclereg dependency); in the separate venv of
``benchmarks/requirements-reference.txt``:

    .venv-bench/bin/python -m pytest benchmarks/test_composite_ants.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ants = pytest.importorskip("ants", reason="antspyx lives in the separate .venv-bench")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_affine_pipeline import _pair, _registration, _smooth  # noqa: E402

from cyclereg.io.preprocess import Preprocessing  # noqa: E402
from cyclereg.registration.register import model_inputs, write_outputs  # noqa: E402


def test_ants_applies_the_composite_and_the_folded_field_like_cyclereg(tmp_path):
    pair = _pair(3)
    grid, _, _ = model_inputs(pair, Preprocessing(spacing=(1.2,) * 3))
    reg = _registration(pair, _smooth(tuple(reversed(grid.size))))
    write_outputs(reg, warped=tmp_path / "ours.nii.gz", transform=tmp_path / "t.h5")
    write_outputs(reg, transform=tmp_path / "field.nii.gz")
    sitk.WriteImage(pair.fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(pair.moving, str(tmp_path / "moving.nii.gz"))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ours.nii.gz")))
    value_range = np.ptp(sitk.GetArrayFromImage(pair.moving))
    assert np.abs(ours).max() > 0.1 * value_range
    fixed, moving = ants.image_read(str(tmp_path / "fixed.nii.gz")), ants.image_read(str(tmp_path / "moving.nii.gz"))
    for transform in ("t.h5", "field.nii.gz"):
        warped = ants.apply_transforms(fixed, moving, transformlist=[str(tmp_path / transform)], interpolator="linear")
        theirs = warped.numpy().transpose()  # ANTs arrays are (x, y, z), SimpleITK's (z, y, x)
        assert np.abs(theirs - ours).max() < 1e-3 * value_range, transform
