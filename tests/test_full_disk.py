"""Outputs on a full disk or past the file-size limit (``ulimit -f``, ``RLIMIT_FSIZE``): one error line naming
the file, exit code 1, and no file left behind: not the one cut short, not the outputs written before it."""

from __future__ import annotations

import resource
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cyclereg.core.atomic import all_or_nothing, atomic_path
from cyclereg.core.errors import DataError
from cyclereg.io.images import _nifti_complete, save_image

from test_physical import blob

LIMIT = 16_000  # bytes: above a transform file's size, below a 40^3 image's


def _limited(limit: int = LIMIT):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsize")
    fixed = blob((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), seed=1)
    moving = blob((40, 40, 40), (1.0, 1.0, 1.0), (1.0, -1.0, 0.5), seed=1)
    noisy = sitk.GetImageFromArray(sitk.GetArrayFromImage(moving) + np.random.default_rng(0).normal(size=(40, 40, 40))
                                   .astype(np.float32) * 5)  # noise: gzips badly
    noisy.CopyInformation(moving)
    sitk.WriteImage(fixed, str(root / "fixed.nii.gz"))
    sitk.WriteImage(noisy, str(root / "moving.nii.gz"))
    return root


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_an_image_past_the_file_size_limit_leaves_nothing(images, tmp_path, suffix):
    """``cyclereg affine`` writes its transform (small), then the warped image (too large): the command
    fails with one line naming the image, and neither output exists afterwards."""
    out = tmp_path / "out"
    out.mkdir()
    argv = [sys.executable, "-m", "cyclereg", "affine", "--fixed", images / "fixed.nii.gz", "--moving",
            images / "moving.nii.gz", "--transform", out / "affine.tfm", "--warped", out / f"warped{suffix}", "--steps", 2]
    done = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=300, preexec_fn=_limited())
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == (f"cyclereg: error: output {out / f'warped{suffix}'} could not be written whole "
                        f"(over the file-size limit of {LIMIT} bytes (ulimit -f)); nothing was written")
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("form", ["field", "[affine, field]", "composite"])
def test_a_transform_past_the_file_size_limit_leaves_nothing(images, tmp_path, form):
    """A displacement field alone, as a list of parts (what register writes) or as a composite transform."""
    field = sitk.GetImageFromArray(np.zeros((20, 20, 20, 3)), isVector=True)
    transform = {"field": "field", "[affine, field]": "[AffineTransform(3), field]",
                 "composite": "CompositeTransform([AffineTransform(3), field])"}[form]
    script = ("import sys; from SimpleITK import AffineTransform, CompositeTransform, DisplacementFieldTransform, ReadImage; "
              "from cyclereg.io.transforms import write_transform; from cyclereg.cli import main; "
              "from cyclereg.core.errors import CycleregError\n"
              "field = DisplacementFieldTransform(ReadImage(sys.argv[1]))\n"
              f"try:\n    write_transform(sys.argv[2], {transform})\n"
              "except CycleregError as err:\n    print(err, file=sys.stderr); sys.exit(err.exit_code)\n")
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat64), str(tmp_path / "field.mha"))
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "field.mha"), str(out / "t.h5")],
                          capture_output=True, text=True, timeout=120, preexec_fn=_limited())
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"output {out / 't.h5'} could not be written")
    assert list(out.iterdir()) == []


def test_nifti_completeness_is_read_from_the_header(tmp_path):
    image = blob((12, 10, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    for name in ("a.nii", "a.nii.gz"):
        save_image(image, tmp_path / name)
        assert _nifti_complete(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) - 40])
        assert not _nifti_complete(tmp_path / f"cut_{name}")


def test_outputs_of_a_failed_block_are_all_removed(tmp_path):
    with pytest.raises(DataError):
        with all_or_nothing():
            with atomic_path(tmp_path / "first.json") as tmp:
                tmp.write_text("{}")
            assert not (tmp_path / "first.json").exists()  # not before the block ends
            raise DataError("the second output failed")
    assert list(tmp_path.iterdir()) == []
    with all_or_nothing():
        for name in ("a.json", "b.json"):
            with atomic_path(tmp_path / name) as tmp:
                tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


@pytest.mark.parametrize("writer", ["torch", "text"])
def test_python_writers_past_the_limit_give_the_same_line(tmp_path, writer):
    """Checkpoints (torch.save) and text outputs: the same one line, nothing left."""
    body = {"torch": "import torch; torch.save({'w': torch.zeros(100_000)}, tmp)",
            "text": "tmp.write_text('x' * 100_000)"}[writer]
    script = ("import sys; from cyclereg.core.atomic import atomic_path; from cyclereg.core.errors import DataError\n"
              f"try:\n    with atomic_path(sys.argv[1]) as tmp:\n        {body}\n"
              "except DataError as err:\n    print(err, file=sys.stderr); sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.bin")], capture_output=True, text=True,
                          timeout=120, preexec_fn=_limited())
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (f"output {tmp_path / 'out.bin'} could not be written whole (over the file-size "
                                   f"limit of {LIMIT} bytes (ulimit -f)); nothing was written")
    assert list(tmp_path.iterdir()) == []
