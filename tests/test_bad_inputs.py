"""The corpus of bad inputs: for each, the exact one-line error a user sees, the exit code (2 for a
bad argument or config, 1 for bad data), no traceback, and no output file left behind.

Every case runs the command line in-process (``cyclereg.cli.main``); a few also run as a subprocess
to check that nothing else reaches the terminal (ITK's C libraries print on stderr themselves).
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from safetensors import safe_open
from safetensors.torch import save_file

from cyclereg.cli import main
from cyclereg.core.config import config_from_dict
from cyclereg.models.modelfile import ModelInfo, build_from_info, save_model

from conftest import tiny_config_dict, write_toml


class Payload:
    """Unpickling this object would create the file ``marker``: a model file that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _image(shape, value=None, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) if value is None else np.full(shape, value)).astype(np.float32)


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _nifti_with_dims(path, dims):
    """An uncompressed NIfTI-1 file whose header claims ``dims`` (no check by nibabel), with 64 bytes of data."""
    header = bytearray(nib.Nifti1Header().binaryblock)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<h", header, 70, 16)  # float32
    struct.pack_into("<h", header, 72, 32)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)  # pixdim
    Path(path).write_bytes(bytes(header) + b"\0" * 4 + b"\0" * 64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    c = tmp_path_factory.mktemp("corpus")
    _write(c / "fixed.nii.gz", _image((16, 16), seed=1))
    _write(c / "moving.nii.gz", _image((16, 16), seed=2))
    _write(c / "volume.nii.gz", _image((8, 8, 8), seed=3))
    (c / "empty.nii.gz").write_bytes(b"")
    whole = (c / "fixed.nii.gz").read_bytes()
    (c / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (c / "text.nii.gz").write_text("patient notes, not an image\n")
    (c / "nifti.mha").write_bytes((c / "fixed.nii.gz").read_bytes())  # an extension that lies about the content
    nib.save(nib.Nifti1Image(np.zeros(10, np.float32), np.eye(4)), str(c / "line.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 3), np.float32), np.eye(4)), str(c / "series.nii.gz"))
    nib.save(nib.Nifti1Image(_image((16, 16, 1)), np.eye(4)), str(c / "slab.nii.gz"))
    _nifti_with_dims(c / "zero.nii", (16, 0))
    _nifti_with_dims(c / "huge.nii", (30000, 30000, 30000))
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        array = _image((16, 16))
        array[3, 4] = value
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(c / f"{name}.nii.gz"))
        _write(c / f"{name}.mha", array)
    _write(c / "constant.nii.gz", _image((16, 16), 3.0))
    labels = np.zeros((16, 16), np.float32)
    labels[2:6, 2:6] = 1.5
    _write(c / "float_labels.nii.gz", labels)
    _write(c / "big_labels.nii.gz", (labels * 700).astype(np.int16))  # 1050: more than a PNG's 8 bits
    far = sitk.GetImageFromArray((labels > 0).astype(np.int16))
    far.SetOrigin((500.0, 500.0))
    sitk.WriteImage(far, str(c / "far_labels.nii.gz"))
    (c / "folder").mkdir()
    (c / "file.txt").write_text("a file\n")

    cfg = config_from_dict(tiny_config_dict())
    info = ModelInfo(cfg, (16, 16))
    save_model(c / "model.safetensors", build_from_info(info), info)
    with safe_open(str(c / "model.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(c / "newer.safetensors"), metadata={**meta, "format_version": "99"})
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first] + 1}, str(c / "tampered.safetensors"), metadata=meta)
    whole = (c / "model.safetensors").read_bytes()
    (c / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (c / "pickle.safetensors").write_bytes(pickle.dumps(Payload(c / "pwned")))

    (c / "missing_column.csv").write_text("fixed,mov\nfixed.nii.gz,moving.nii.gz\n")
    (c / "short_row.csv").write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz\nfixed.nii.gz\n")
    (c / "missing_file.csv").write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz\nfixed.nii.gz,gone.nii.gz\n")
    (c / "binary.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    (c / "empty.csv").write_text("fixed,moving\n")

    for name, text in {"unknown_key": "[model]\nlamda = 1.0\n", "wrong_type": "[model]\nlam = 'big'\n",
                       "negative_lambda": "[model]\nlam = -1.0\n", "zero_steps": "[train]\nsteps = 0\n",
                       "not_toml": "[model\n"}.items():
        (c / f"{name}.toml").write_text(text)
    write_toml(c / "ok.toml", tiny_config_dict())
    (c / "resume").mkdir()
    (c / "resume" / "checkpoint.pt").write_bytes(pickle.dumps(Payload(c / "pwned")))
    return c


REG = ["register", "--model", "{c}/model.safetensors", "--fixed", "{c}/fixed.nii.gz"]


def _moving(name):
    return [*REG, "--moving", f"{{c}}/{name}", "--warped", "{out}/warped.nii.gz"]


# (case, argv, exit code, message after "cyclereg: error: "); {c}: the corpus, {out}: an empty folder.
# A message ending in "..." is compared up to there (the rest comes from a library and its version).
CASES = [
    ("missing path", [*REG[:4], "{c}/nowhere.nii.gz", "--moving", "{c}/moving.nii.gz", "--warped", "{out}/w.nii.gz"], 1,
     "--fixed {c}/nowhere.nii.gz does not exist"),
    ("folder for a file", _moving("folder"), 1,
     "--moving {c}/folder is a folder without a DICOM series; expected an image file or a DICOM folder"),
    ("empty file", _moving("empty.nii.gz"), 1, "--moving {c}/empty.nii.gz is an empty file"),
    ("truncated gzip", _moving("truncated.nii.gz"), 1,
     "--moving {c}/truncated.nii.gz is a damaged or truncated gzip file "
     "(Compressed file ended before the end-of-stream marker was reached)"),
    ("text named .nii.gz", _moving("text.nii.gz"), 1,
     '--moving {c}/text.nii.gz cannot be read as an image (Unable to determine ImageIO reader for "{c}/text.nii.gz")'),
    ("NIfTI named .mha", _moving("nifti.mha"), 1,
     "--moving {c}/nifti.mha holds a NIfTI image but its name says otherwise; ITK chooses its reader by the name: "
     "rename it to end in .nii or .nii.gz"),
    ("1D image", _moving("line.nii.gz"), 1, "--moving {c}/line.nii.gz is 1D; expected a 2D or 3D image"),
    ("4D image", _moving("series.nii.gz"), 1, "--moving {c}/series.nii.gz is 4D; expected a 2D or 3D image"),
    ("axis of size 1", _moving("slab.nii.gz"), 1,
     "--moving {c}/slab.nii.gz has size (16, 16, 1); every axis needs at least 2 voxels"),
    ("axis of size 0", _moving("zero.nii"), 1,
     "--moving {c}/zero.nii has size (16, 1); every axis needs at least 2 voxels"),  # ITK reads a 0 as 1
    ("NaN voxel (NIfTI)", _moving("nan.nii.gz"), 1,
     "--moving {c}/nan.nii.gz holds 1 NaN or infinite voxel(s); expected finite values"),
    ("Inf voxel (NIfTI)", _moving("inf.nii.gz"), 1,
     "--moving {c}/inf.nii.gz holds 1 NaN or infinite voxel(s); expected finite values"),
    ("NaN voxel (MHA)", _moving("nan.mha"), 1, "--moving {c}/nan.mha holds 1 NaN or infinite voxel(s); expected finite values"),
    ("Inf voxel (MHA)", _moving("inf.mha"), 1, "--moving {c}/inf.mha holds 1 NaN or infinite voxel(s); expected finite values"),
    ("constant image", _moving("constant.nii.gz"), 1,
     "--moving {c}/constant.nii.gz has no foreground (the image is constant); nothing to align"),
    ("constant image, no affine stage", [*_moving("constant.nii.gz"), "--affine", "none"], 1,
     "--moving {c}/constant.nii.gz is constant (every voxel 3); nothing to register"),
    ("huge header", _moving("huge.nii"), 1,
     "--moving {c}/huge.nii claims a size of 30000 x 30000 x 30000 voxels (1.08e+05 GB as float32), "
     "more than this machine's memory ({memory} GB)"),
    ("float label map", [*REG, "--moving", "{c}/moving.nii.gz", "--moving-labels", "{c}/float_labels.nii.gz",
                         "--warped-labels", "{out}/labels.nii.gz"], 1,
     "--moving-labels {c}/float_labels.nii.gz holds non-integer values; expected a label map"),
    ("labels too big for the output", [*REG, "--moving", "{c}/moving.nii.gz", "--moving-labels", "{c}/big_labels.nii.gz",
                                       "--warped-labels", "{out}/labels.png", "--warped", "{out}/w.nii.gz"], 2,
     "--warped-labels {out}/labels.png: the values go from 0 to 1050, but the file holds uint8 (0 to 255); "
     "name a .nii.gz or .mha file"),
    ("labels elsewhere", [*REG, "--moving", "{c}/moving.nii.gz", "--moving-labels", "{c}/far_labels.nii.gz",
                          "--warped-labels", "{out}/labels.nii.gz"], 1,
     "--moving-labels {c}/far_labels.nii.gz does not overlap the moving image in physical space (origin, spacing, direction)"),
    ("fixed 3D, moving 2D", ["optimize", "--fixed", "{c}/volume.nii.gz", "--moving", "{c}/moving.nii.gz",
                             "--warped", "{out}/w.nii.gz", "--steps", "2"], 1,
     "--moving {c}/moving.nii.gz is 2D but --fixed is 3D"),
    ("2D model, 3D images", [*REG[:4], "{c}/volume.nii.gz", "--moving", "{c}/volume.nii.gz", "--warped", "{out}/w.nii.gz"], 1,
     "--fixed {c}/volume.nii.gz is 3D but the model registers 2D images"),
    ("newer model format", ["register", "--model", "{c}/newer.safetensors", "--fixed", "{c}/fixed.nii.gz",
                            "--moving", "{c}/moving.nii.gz", "--warped", "{out}/w.nii.gz"], 1,
     "model file {c}/newer.safetensors has format version 99; this cyclereg {version} reads up to 3"),
    ("tampered model", ["register", "--model", "{c}/tampered.safetensors", "--fixed", "{c}/fixed.nii.gz",
                        "--moving", "{c}/moving.nii.gz", "--warped", "{out}/w.nii.gz"], 1,
     "model file {c}/tampered.safetensors: weights do not match their SHA-256 (file altered or damaged)"),
    ("truncated model", ["evaluate", "--model", "{c}/truncated.safetensors", "--json", "{out}/s.json"], 1,
     "model file {c}/truncated.safetensors is not a cyclereg model (cannot read safetensors: ..."),
    ("pickle payload as model", ["evaluate", "--model", "{c}/pickle.safetensors", "--json", "{out}/s.json"], 1,
     "model file {c}/pickle.safetensors is not a cyclereg model (cannot read safetensors: ..."),
    ("pickle payload as checkpoint", ["train", "{c}/ok.toml", "--out", "{c}/resume", "--resume", "--quiet"], 1,
     "checkpoint {c}/resume/checkpoint.pt cannot be read: it is not a PyTorch checkpoint; "
     "cyclereg never unpickles arbitrary objects"),
    ("config: unknown key", ["train", "{c}/unknown_key.toml", "--out", "{out}/run"], 2,
     "{c}/unknown_key.toml: config key 'model.lamda' is unknown; "
     "expected one of: method, similarity, lam, noise, sigma, window, alpha, beta, shared, label_weight, svf, steps"),
    ("config: wrong type", ["train", "{c}/wrong_type.toml", "--out", "{out}/run"], 2,
     "{c}/wrong_type.toml: config key 'model.lam': expected a number, got 'big'"),
    ("config: negative lambda", ["train", "{c}/negative_lambda.toml", "--out", "{out}/run"], 2,
     "{c}/negative_lambda.toml: config key 'model.lam': expected a weight >= 0, got -1.0"),
    ("config: zero steps", ["train", "{c}/zero_steps.toml", "--out", "{out}/run"], 2,
     "{c}/zero_steps.toml: config key 'train.steps': expected a number of steps >= 1, got 0"),
    ("config: --set out of range", ["train", "{c}/ok.toml", "--out", "{out}/run", "--set", "train.lr=0"], 2,
     "{c}/ok.toml: config key 'train.lr': expected a learning rate > 0, got 0.0"),
    ("config: not TOML", ["train", "{c}/not_toml.toml", "--out", "{out}/run"], 2,
     "config file {c}/not_toml.toml is not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"),
    ("config: missing", ["train", "{c}/nothing.toml", "--out", "{out}/run"], 2, "config file {c}/nothing.toml does not exist"),
    ("option: wrong type", ["evaluate", "--model", "{c}/model.safetensors", "--pairs", "many"], 2,
     "argument --pairs: invalid int value: 'many' (see 'cyclereg evaluate --help')"),
    ("register --patch, one-step model", [*REG, "--moving", "{c}/moving.nii.gz", "--warped", "{out}/w.nii.gz", "--patch", "8", "8"], 2,
     "--patch needs a model of two steps (global, local); {c}/model.safetensors has 1"),
    ("option: out of range", ["optimize", "--fixed", "{c}/fixed.nii.gz", "--moving", "{c}/moving.nii.gz",
                              "--warped", "{out}/w.nii.gz", "--steps", "0"], 2, "--steps: expected at least 1, got 0"),
    ("pairs CSV: missing column", ["evaluate", "--model", "{c}/model.safetensors", "--pairs-csv", "{c}/missing_column.csv",
                                   "--json", "{out}/s.json"], 1,
     "--pairs-csv {c}/missing_column.csv: missing column(s) moving; expected fixed, moving[, fixed_labels, moving_labels, affine]"),
    ("pairs CSV: short row", ["evaluate", "--model", "{c}/model.safetensors", "--pairs-csv", "{c}/short_row.csv",
                              "--json", "{out}/s.json"], 1, "--pairs-csv {c}/short_row.csv, line 3: empty fixed or moving path"),
    ("pairs CSV: unreadable row", ["evaluate", "--model", "{c}/model.safetensors", "--pairs-csv", "{c}/missing_file.csv",
                                   "--json", "{out}/s.json", "--per-pair", "{out}/p.csv"], 1,
     "--pairs-csv {c}/missing_file.csv, line 3: moving {c}/gone.nii.gz does not exist"),
    ("pairs CSV: binary", ["evaluate", "--model", "{c}/model.safetensors", "--pairs-csv", "{c}/binary.csv"], 1,
     "--pairs-csv {c}/binary.csv is not a readable CSV file "
     "('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    ("pairs CSV: no pairs", ["evaluate", "--model", "{c}/model.safetensors", "--pairs-csv", "{c}/empty.csv"], 1,
     "--pairs-csv {c}/empty.csv lists no pairs"),
    ("output folder missing", [*REG, "--moving", "{c}/moving.nii.gz", "--warped", "{out}/no/w.nii.gz"], 2,
     "--warped {out}/no/w.nii.gz: folder {out}/no does not exist"),
    ("output folder is a file", [*REG, "--moving", "{c}/moving.nii.gz", "--transform", "{c}/file.txt/t.h5"], 2,
     "--transform {c}/file.txt/t.h5: {c}/file.txt is a file, not a folder"),
    ("output is a folder", [*REG, "--moving", "{c}/moving.nii.gz", "--jacobian", "{c}/folder"], 2,
     "--jacobian {c}/folder is a folder; expected a file name"),
    ("train --out is a file", ["train", "{c}/ok.toml", "--out", "{c}/file.txt"], 2,
     "--out {c}/file.txt is a file; expected a folder for the run"),
    ("no output named", [*REG, "--moving", "{c}/moving.nii.gz"], 2,
     "name at least one output (--warped, --transform, --transform-inverse, --warped-labels, --jacobian, --figure)"),
    ("warp: text as transform", ["warp", "--transform", "{c}/text.nii.gz", "--moving", "{c}/moving.nii.gz",
                                 "--fixed", "{c}/fixed.nii.gz", "--out", "{out}/w.nii.gz"], 1,
     '--transform {c}/text.nii.gz cannot be read as a transform (Unable to determine ImageIO reader for "{c}/text.nii.gz")'),
]


def _listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _fill(text: str, c: Path, out: Path) -> str:
    from cyclereg import __version__
    from cyclereg.io.images import _memory_bytes

    return text.format(c=c, out=out, version=__version__, memory=f"{_memory_bytes() / 1e9:.3g}")


@pytest.mark.parametrize("case, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_no_output(corpus, tmp_path, capsys, case, argv, code, message):
    out = tmp_path / "out"
    out.mkdir()
    before = _listing(corpus)
    try:
        result = main([_fill(a, corpus, out) for a in argv])
    except SystemExit as exit_:  # argparse's errors
        result = exit_.code
    stdout, stderr = capsys.readouterr()
    expected = "cyclereg: error: " + _fill(message, corpus, out)
    if expected.endswith("..."):
        assert stderr.startswith(expected[:-3]) and stderr.count("\n") == 1, stderr
    else:
        assert stderr == expected + "\n"
    assert result == code
    assert "Traceback" not in stdout + stderr
    assert _listing(out) == [], "an output was left behind"
    assert _listing(corpus) == before, "a file appeared or vanished beside the inputs"
    assert not (corpus / "pwned").exists(), "a pickle payload ran"


@pytest.mark.parametrize("name", ["zero.nii", "folder", "huge.nii"])
def test_nothing_else_reaches_the_terminal(corpus, tmp_path, name):
    """ITK's C libraries write to the process's stderr directly; a subprocess shows what a user sees."""
    argv = [sys.executable, "-m", "cyclereg", *[_fill(a, corpus, tmp_path) for a in _moving(name)]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("cyclereg: error: --moving"), result.stderr


def test_debug_shows_the_traceback_of_a_corpus_case(corpus, tmp_path):
    from cyclereg.core.errors import DataError

    with pytest.raises(DataError, match="empty file"):
        main(["--debug", *[_fill(a, corpus, tmp_path) for a in _moving("empty.nii.gz")]])
