"""Random valid NIfTI headers (spacing, origin, direction, qform and sform codes, data type, scaling
slope): cyclereg reads the same physical points as nibabel (converted to ITK's LPS) and SimpleITK, and
the same voxel values, or refuses the file with one of the corpus' messages (a sheared frame)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclereg.core.errors import DataError
from cyclereg.io.images import read_image

BASE = settings(derandomize=True, database=None, deadline=None, print_blob=False, max_examples=40)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


headers = st.fixed_dictionaries({
    "shape": st.tuples(*[st.integers(2, 7)] * 3),
    "spacing": st.tuples(*[st.floats(0.3, 6.0)] * 3),
    "origin": st.tuples(*[st.floats(-200.0, 200.0)] * 3),
    "angles": st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    "flip": st.sampled_from([1.0, -1.0]),  # handedness of the index frame
    "shear": st.sampled_from([0.0, 0.0, 0.0, 0.25]),
    "codes": st.sampled_from([(1, 1), (1, 0), (0, 1), (2, 1), (1, 2)]),  # (sform, qform)
    "dtype": st.sampled_from([np.uint8, np.int16, np.float32, np.float64]),
    "slope": st.sampled_from([None, 1.0, 2.5]),
})


@BASE
@given(header=headers)
def test_cyclereg_reads_what_nibabel_and_simpleitk_read(header):
    linear = _rotation(header["angles"]) @ np.diag(header["spacing"]) @ np.diag([1.0, 1.0, header["flip"]])
    linear = linear @ (np.eye(3) + header["shear"] * np.eye(3, k=1))
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, header["origin"]
    rng = np.random.default_rng(0)
    data = (rng.random(header["shape"]) * 100).astype(header["dtype"])
    image = nib.Nifti1Image(data, None)
    s_code, q_code = header["codes"]
    image.set_sform(affine, code=s_code)
    image.set_qform(affine if not header["shear"] else np.eye(4), code=q_code)  # a qform cannot hold a shear
    if header["slope"] is not None:
        image.header.set_slope_inter(header["slope"], 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nii.gz"
        nib.save(image, str(path))
        if header["shear"] and s_code:
            try:
                read = read_image(path, "--fixed")
            except DataError as err:  # sheared sform and no qform: the corpus' message
                assert not q_code and "has a direction matrix with shear" in str(err)
                return
            assert q_code  # a qform to fall back on, as ITK does
            used = nib.load(str(path)).header.get_qform()
        else:
            read = read_image(path, "--fixed")
            used = nib.load(str(path)).affine  # nibabel's choice: the sform if its code is set, else the qform
        reference = sitk.ReadImage(str(path))
        loaded = nib.load(str(path))
        index = np.array([[i, j, k] for i in (0, header["shape"][0] - 1) for j in (0, header["shape"][1] - 1) for k in (0, 1)], float)
        expected = (RAS_TO_LPS @ used @ np.c_[index, np.ones(len(index))].T).T[:, :3]
        ours = np.array([read.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in index])
        theirs = np.array([reference.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in index])
        np.testing.assert_allclose(ours, expected, atol=1e-3)
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        values = np.asarray(loaded.dataobj, dtype=np.float64)  # scaled by the slope, as ITK scales them
        np.testing.assert_allclose(sitk.GetArrayFromImage(read).astype(np.float64).transpose(2, 1, 0), values, rtol=1e-5, atol=1e-4)
