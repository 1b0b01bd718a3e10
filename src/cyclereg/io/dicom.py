"""DICOM folders: a folder is read as its one series, or as the series chosen by ``--series UID``
(:func:`selected_series`); a folder of several series without a choice is refused, naming them."""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import SimpleITK as sitk

from cyclereg.core.errors import DataError
from cyclereg.io.itk import itk_messages

__all__ = ["selected_series", "read_dicom_series"]

# The DICOM series chosen by ``--series UID`` (any number): a folder holding several series is read as the
# one of them named here. Set for the length of a command by :func:`selected_series`.
_SERIES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("cyclereg_series", default=())


@contextlib.contextmanager
def selected_series(uids):
    """Within the block, a DICOM folder with several series is read as the one whose UID is in ``uids``."""
    token = _SERIES.set(tuple(uids or ()))
    try:
        yield
    finally:
        _SERIES.reset(token)


def _describe_series(folder: Path, uid: str) -> str:
    """``UID (N files, description)`` of one series of a DICOM folder."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    description = ""
    try:
        reader.ReadImageInformation()
        if reader.HasMetaDataKey("0008|103e"):
            description = reader.GetMetaData("0008|103e").strip()
    except RuntimeError:
        pass
    return f"{uid} ({len(files)} files{', ' + repr(description) if description else ''})"


def read_dicom_series(folder: Path, role: str) -> sitk.Image:
    """A folder is read as a DICOM series: the only series in it, or the one chosen by ``--series``."""
    name = f"{role} {folder}"
    with itk_messages(name, "cannot be read as a DICOM series", show_warnings=False):  # "no series found"
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{name} is a folder without a DICOM series; expected an image file or a DICOM folder")
    if len(series) > 1:
        chosen = [uid for uid in series if uid in _SERIES.get()]
        if len(chosen) != 1:
            listing = "; ".join(_describe_series(folder, uid) for uid in series)
            raise DataError(f"{name} holds {len(series)} DICOM series: {listing}; choose one with --series UID")
        series = chosen
    reader = sitk.ImageSeriesReader()
    with itk_messages(name, "cannot be read as a DICOM series"):
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
        return reader.Execute()
