"""DICOM folders: a folder of one series is read as that volume; a folder of several is refused with the
series named, unless ``--series UID`` chooses one."""

from __future__ import annotations

import locale

import numpy as np
import pytest
import SimpleITK as sitk

from cyclereg.core.errors import DataError
from cyclereg.io.dicom import selected_series
from cyclereg.io.images import read_image

from test_cli import assert_one_line_error, run_cli
from test_physical import blob

STUDY = "1.2.826.0.1.3680043.8.498.1"
FIRST, SECOND = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"


def write_series(image: sitk.Image, folder, uid: str, description: str) -> None:
    """``image`` as a DICOM series of 2D slices (int16), with the tags a scanner writes for geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in (("0008|0060", "MR"), ("0020|000d", STUDY), ("0020|000e", uid), ("0008|103e", description),
                           ("0008|0018", f"{uid}.{k + 1}"), ("0020|0013", str(k + 1)),
                           ("0020|0037", "\\".join(map(str, direction[0:7:3] + direction[1:8:3]))),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0018|0050", str(image.GetSpacing()[2]))):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-2:]}_{k:03d}.dcm"))
        writer.Execute(slice_)
    locale.setlocale(locale.LC_ALL, "")  # GDCM's writer leaves the C library in the "C" locale


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    first = blob((20, 18, 12), (1.0, 1.0, 2.0), (-10.0, -8.0, -6.0), seed=1)
    second = blob((16, 16, 10), (1.25, 1.25, 2.5), (-9.0, -9.0, -5.0), seed=2)
    write_series(first, root / "two", FIRST, "t1 mprage")
    write_series(second, root / "two", SECOND, "t1 repeat")
    write_series(first, root / "one", FIRST, "t1 mprage")
    sitk.WriteImage(first, str(root / "first.nii.gz"))
    return root, first, second


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_a_folder_of_one_series_is_that_volume(scans):
    root, first, _ = scans
    image = read_image(root / "one", "--fixed")
    _same_grid(image, first)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.Cast(first, sitk.sitkInt16)))


def test_a_folder_of_two_series_is_refused_naming_them(scans):
    root, _, _ = scans
    with pytest.raises(DataError) as err:
        read_image(root / "two", "--moving")
    message = str(err.value)
    assert message.startswith(f"--moving {root / 'two'} holds 2 DICOM series: ")
    assert f"{FIRST} (12 files, 't1 mprage')" in message and f"{SECOND} (10 files, 't1 repeat')" in message
    assert message.endswith("choose one with --series UID")


def test_series_chooses_one_and_others_listed_do_not_matter(scans):
    root, first, second = scans
    with selected_series([SECOND, "1.2.3.999"]):
        _same_grid(read_image(root / "two"), second)
    with selected_series([FIRST]):
        _same_grid(read_image(root / "two"), first)
    with selected_series([FIRST, SECOND]), pytest.raises(DataError, match="holds 2 DICOM series"):
        read_image(root / "two")  # both named: still ambiguous


def test_register_with_two_series_refuses_then_series_registers(scans, tmp_path, capsys):
    root, _, _ = scans
    warped, transform = tmp_path / "warped.nii.gz", tmp_path / "affine.tfm"
    argv = ["affine", "--fixed", root / "first.nii.gz", "--moving", root / "two", "--warped", warped, "--transform", transform]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    assert_one_line_error(err, "holds 2 DICOM series", FIRST, SECOND, "--series UID")
    assert not warped.exists() and not transform.exists()
    code, _, err = run_cli(capsys, *argv, "--series", FIRST)
    assert code == 0, err
    result = sitk.ReadImage(str(warped))
    assert result.GetSize() == (20, 18, 12)

