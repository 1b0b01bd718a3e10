"""Soak test (not in CI): train and register again and again, killing at random, and check that
nothing is lost.

Training: a small run is first trained once without interruption (the reference). Then, until the
time is up or ``--kills`` kills were made, a fresh run is started and killed at a random moment
(``kill -9``, or SIGTERM one time in four), resumed with ``--resume`` (and maybe killed again), until
it completes; its final weights must be bit-identical to the reference.

Registration: ``cyclereg register`` is killed with ``kill -9`` at random moments; every output file
present afterwards must be complete and equal to the reference outputs (atomic writes), and no
temporary file may be left visible under the output names.

    python benchmarks/soak.py --minutes 10             # report only
    python benchmarks/soak.py --kills 20 --append      # the issue's target, appended to BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_report  # noqa: E402

CONFIG = """
[data]
dataset = "triangles"
size = 24
n_train = 200
val_pairs = 8

[model]
method = "gradicon"
similarity = "lncc"
lam = 1.0
noise = 0.1

[[model.steps]]
network = "unet"
params = { channels = [8, 16] }

[train]
steps = 120
batch_size = 8
lr = 1e-3
log_every = 1
val_every = 50
checkpoint_every = 10
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
CLI = [sys.executable, "-m", "cyclereg"]


def _train(config: Path, out: Path, resume: bool) -> subprocess.Popen:
    argv = [*CLI, "train", str(config), "--out", str(out), "--quiet", "--device", "cpu"] + (["--resume"] if resume else [])
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def _log_size(out: Path) -> int:
    try:
        return (out / "log.jsonl").stat().st_size
    except FileNotFoundError:
        return -1


def _wait_for_log(proc: subprocess.Popen, out: Path, before: int = -1) -> float:
    """Wait until the run trains (its log grows past ``before`` bytes); returns the time."""
    while _log_size(out) <= before and proc.poll() is None:
        time.sleep(0.01)
    return time.monotonic()


def _identical(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _register_argv(model: Path, fixed: Path, moving: Path, out: Path) -> list:
    return [*CLI, "register", "--model", str(model), "--fixed", str(fixed), "--moving", str(moving),
            "--warped", str(out / "warped.nii.gz"), "--transform", str(out / "transform.h5"),
            "--jacobian", str(out / "jacobian.nii.gz")]


def _outputs_equal(out: Path, reference: Path) -> tuple[int, bool]:
    """Number of outputs present and whether every one equals the reference (and nothing else is there)."""
    names = sorted(p.name for p in out.iterdir())
    expected = {"warped.nii.gz", "transform.h5", "jacobian.nii.gz"}
    if not set(names) <= expected:
        return len(names), False
    ok = True
    for name in names:
        if name.endswith(".h5"):
            a = sitk.ReadTransform(str(out / name))
            b = sitk.ReadTransform(str(reference / name))
            ok &= a.GetFixedParameters() == b.GetFixedParameters() and a.GetParameters() == b.GetParameters()
        else:
            ok &= bool(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(reference / name)))))
    return len(names), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="stop after this long (default: %(default)s)")
    parser.add_argument("--kills", type=int, default=None, help="stop the training part after this many kills")
    parser.add_argument("--register-kills", type=int, default=20, help="kills of cyclereg register (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help="append the report to BENCHMARKS.md")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    deadline = time.monotonic() + 60 * args.minutes
    work = Path(tempfile.mkdtemp(prefix="cyclereg-soak-"))
    config = work / "soak.toml"
    config.write_text(CONFIG)

    t0 = time.monotonic()
    reference = work / "reference"
    proc = _train(config, reference, resume=False)
    started = _wait_for_log(proc, reference) - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed: {err}")
    run_seconds = time.monotonic() - t0
    train_seconds = run_seconds - started
    print(f"reference run: {run_seconds:.1f} s, of which {train_seconds:.1f} s training")

    runs = kills = terms = resumes = restarts = identical = 0
    while time.monotonic() < deadline and (args.kills is None or kills < args.kills):
        out = work / f"run{runs}"
        runs += 1
        resume = False
        while True:
            before = _log_size(out)
            proc = _train(config, out, resume)
            _wait_for_log(proc, out, before)
            try:
                proc.wait(timeout=rng.uniform(0.0, train_seconds))
            except subprocess.TimeoutExpired:
                if rng.random() < 0.25:
                    proc.send_signal(signal.SIGTERM)
                    terms += 1
                else:
                    proc.kill()
                    kills += 1
                proc.communicate()
            if proc.returncode == 0:
                break
            if not (out / "checkpoint.pt").exists():  # killed before the first checkpoint: start again
                shutil.rmtree(out, ignore_errors=True)
                resume = False
                restarts += 1
                continue
            resume = True
            resumes += 1
        same = _identical(out / "model.safetensors", reference / "model.safetensors")
        identical += same
        print(f"run {runs}: {'bit-identical' if same else 'DIFFERENT'} (kills {kills}, SIGTERM {terms}, resumes {resumes})")
        shutil.rmtree(out)

    # Registration killed at random moments.
    images = work / "images"
    images.mkdir()
    rs = np.random.default_rng(args.seed)
    for name in ("fixed", "moving"):
        array = rs.random((96, 96)).astype(np.float32)
        sitk.WriteImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(array), 4.0), str(images / f"{name}.nii.gz"))
    model = reference / "model.safetensors"
    ref_out = work / "register_reference"
    ref_out.mkdir()
    t0 = time.monotonic()
    subprocess.run(_register_argv(model, images / "fixed.nii.gz", images / "moving.nii.gz", ref_out), check=True,
                   env=ENV, capture_output=True)
    register_seconds = time.monotonic() - t0
    reg_kills = partial = complete_sets = leftovers = 0
    for i in range(args.register_kills):
        out = work / f"register{i}"
        out.mkdir()
        proc = subprocess.Popen(_register_argv(model, images / "fixed.nii.gz", images / "moving.nii.gz", out),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        try:
            proc.wait(timeout=rng.uniform(0.5 * register_seconds, register_seconds))
        except subprocess.TimeoutExpired:
            proc.kill()
            reg_kills += 1
            proc.wait()
        for stale in out.glob(".*"):  # the temporary file of a write cut short: hidden, never under an output name
            stale.unlink()
            leftovers += 1
        present, ok = _outputs_equal(out, ref_out)
        partial += not ok
        complete_sets += present == 3
        shutil.rmtree(out)
    shutil.rmtree(work)

    rows = [("training runs", runs), ("kill -9 during training", kills), ("SIGTERM during training", terms),
            ("resumes from a checkpoint", resumes), ("restarts (killed before the first checkpoint)", restarts),
            ("runs bit-identical to the uninterrupted run", f"{identical} of {runs}"),
            ("cyclereg register killed (kill -9)", f"{reg_kills} of {args.register_kills}"),
            ("register outputs differing from the reference or partial", partial),
            ("register runs that left all 3 outputs", complete_sets),
            ("hidden temporary files left by killed writes", leftovers)]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.append:
        append_report("Soak: kill and resume (issue 6)",
                      f"`python benchmarks/soak.py --seed {args.seed}{f' --kills {args.kills}' if args.kills else ''} "
                      f"--register-kills {args.register_kills}`: a 120-step GradICON run on 24×24 triangles "
                      f"({run_seconds:.1f} s uninterrupted, {train_seconds:.1f} s of it training; checkpoint every 10 steps), "
                      f"killed at a uniformly random moment of its training and resumed until done (each resume may be killed again); `cyclereg register` ({register_seconds:.1f} s) killed at random "
                      f"in the second half of its run.\n\n" + table)
    return 0 if identical == runs and partial == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
