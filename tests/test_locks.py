"""One writer per folder (``cyclereg.core.locks``): a second ``train`` on a run folder, or a second
``register --pairs-csv`` on an output folder, is refused while the first runs, naming it; a holder killed
with ``kill -9`` leaves no stale lock, and the next job takes the folder over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cyclereg.cli import main
from cyclereg.core.locks import LOCK_NAME

from conftest import smooth_image, tiny_config_dict, write_toml

HOLD = ("import sys, time; from cyclereg.core.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], '--out'):\n    print('held', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a folder; yields (folder, process)."""
    started = []

    def start(folder):
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_a_second_training_on_a_run_folder_is_refused_until_the_first_dies(tmp_path, holder, capsys):
    config = write_toml(tmp_path / "c.toml", tiny_config_dict(train__steps=2))
    run = tmp_path / "run"
    first = holder(run)
    assert main(["train", str(config), "--out", str(run), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cyclereg: error: --out {run} is in use by cyclereg process {first.pid} on ")
    assert err.count("\n") == 1 and sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    os.kill(first.pid, signal.SIGKILL)  # the scheduler kills the job; its requeued copy takes over
    first.wait()
    assert main(["train", str(config), "--out", str(run), "--resume", "--quiet", "--device", "cpu"]) == 0
    assert (run / "model.safetensors").is_file() and not (run / LOCK_NAME).exists()


def test_a_second_batch_on_an_output_folder_is_refused(tmp_path, holder, capsys):
    from cyclereg.core.config import config_from_dict
    from cyclereg.models.modelfile import ModelInfo, build_from_info, save_model

    info = ModelInfo(config_from_dict(tiny_config_dict()), (16, 16))
    save_model(tmp_path / "m.safetensors", build_from_info(info).eval(), info)
    image = sitk.GetImageFromArray(smooth_image((16, 16), 1, seed=1)[0, 0].numpy().astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    (tmp_path / "pairs.csv").write_text("fixed,moving\na.mha,a.mha\n")
    out = tmp_path / "out"
    first = holder(out)
    argv = ["register", "--model", str(tmp_path / "m.safetensors"), "--pairs-csv", str(tmp_path / "pairs.csv"),
            "--out-dir", str(out), "--affine", "none"]
    assert main(argv) == 2
    assert f"--out-dir {out} is in use by cyclereg process {first.pid}" in capsys.readouterr().err
    first.kill()
    first.wait()
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_to_a_transform.h5", "a_to_a_warped.nii.gz"]
