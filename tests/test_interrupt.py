"""Interrupted training: SIGTERM and SIGINT save a checkpoint at a step boundary and exit cleanly;
after ``kill -9`` at any moment, ``--resume`` ends with weights bit-identical to an uninterrupted run;
a non-finite loss stops with the step and the term, keeping the last good checkpoint.

Runs go through ``python -m cyclereg`` in subprocesses with one thread each, as a user's would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cyclereg.core.config import config_from_dict
from cyclereg.core.errors import DataError

from conftest import tiny_config_dict, write_toml

STEPS = 300
# noise > 0 draws from the global generator every step: restored on resume or the runs diverge
CONFIG = tiny_config_dict(model__noise=0.1, train__steps=STEPS, train__val_every=100, train__checkpoint_every=7)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _start(config: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    argv = [sys.executable, "-m", "cyclereg", "train", str(config), "--out", str(out), "--quiet", "--device", "cpu"]
    return subprocess.Popen(argv + (["--resume"] if resume else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _logged_steps(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _wait_for_step(proc, out: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while _logged_steps(out) < step:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_toml(tmp_path_factory.mktemp("interrupt") / "tiny.toml", CONFIG)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> dict:
    """The weights of one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, err = _finish(_start(config, out))
    assert code == 0, err
    return _weights(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_resume_ends_bit_identical(config, reference, tmp_path, sig):
    out = tmp_path / "run"
    proc = _start(config, out)
    _wait_for_step(proc, out, 12)
    proc.send_signal(sig)
    code, err = _finish(proc)
    assert code == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"training stopped by {sig.name} after step" in lines[0], err
    stopped = int(lines[0].split("after step ")[1].split(";")[0])
    assert 12 <= stopped < STEPS
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == stopped  # saved at the step boundary, not at the last periodic checkpoint
    assert not (out / "model.safetensors").exists()
    code, err = _finish(_start(config, out, resume=True))
    assert code == 0, err
    _assert_identical(_weights(out), reference)
    assert _logged_steps(out) == STEPS


def test_kill_9_then_resume_ends_bit_identical(config, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(config, out)
    _wait_for_step(proc, out, 30)
    proc.kill()  # SIGKILL: nothing runs, no handler, no cleanup
    proc.wait()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert saved % 7 == 0 and saved >= 28
    code, err = _finish(_start(config, out, resume=True))
    assert code == 0, err
    _assert_identical(_weights(out), reference)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl", "model.safetensors"]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, STEPS + 1)), "the log has a gap or a repeated step"


def test_a_non_finite_loss_stops_with_step_and_term_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from cyclereg.training import train as train_module

    real = train_module.loss_terms
    calls = {"n": 0}

    def poisoned(model, moving, fixed, settings, labels=None):
        loss, terms = real(model, moving, fixed, settings, labels)
        calls["n"] += 1
        if calls["n"] == 5:
            terms = {**terms, "icon": torch.tensor(float("nan"))}
            loss = loss + terms["icon"]
        return loss, terms

    monkeypatch.setattr(train_module, "loss_terms", poisoned)
    cfg = config_from_dict(tiny_config_dict(train__steps=8, train__checkpoint_every=2))
    with pytest.raises(DataError, match=r"loss term 'icon' is not finite at step 5; the last checkpoint in .* is kept"):
        train_module.train(cfg, tmp_path / "run", progress=False, device="cpu")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "run" / "model.safetensors").exists()
