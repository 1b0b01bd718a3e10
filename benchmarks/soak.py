"""Soak test (not in CI): train and register again and again, killing at random, and check that
nothing is lost.

Training: a small run is first trained once without interruption (the reference). Then, until the
time is up or ``--kills`` kills were made, a fresh run is started and killed at a random moment
(``kill -9``, or SIGTERM one time in four; before its first checkpoint too), and started again with the
same command line, as a requeued cluster job is (``--resume`` from the first start), until it completes;
its final weights must be bit-identical to the reference.

Registration: ``cyclereg register`` (affine stage, then the model) is killed with ``kill -9`` at random
moments; every output file present afterwards must be complete and equal to the reference outputs
(atomic writes), and no temporary file may be left visible under the output names. With ``--shipped``,
the same with the shipped brain model on two real brains of ``../shared/data``.

Batch: ``cyclereg register --pairs-csv`` over ``--batch-pairs`` pairs is killed ``--batch-kills`` times at
random and rerun with the same command line until it completes; every output must equal an uninterrupted
batch's, and no pair complete before a kill may be written again by a rerun.

    python benchmarks/soak.py --minutes 10             # report only
    python benchmarks/soak.py --kills 20 --append      # the issue's target, appended to BENCHMARKS.md
    python benchmarks/soak.py --kills 20 --batch-kills 10 --shipped --append
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
    return len(names), all(_same(out / name, reference / name) for name in names)


def _same(a: Path, b: Path) -> bool:
    """Two outputs hold the same transform (``.h5``) or the same voxels."""
    if a.name.endswith(".h5"):
        x, y = sitk.ReadTransform(str(a)), sitk.ReadTransform(str(b))
        return x.GetFixedParameters() == y.GetFixedParameters() and x.GetParameters() == y.GetParameters()
    return bool(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a))), sitk.GetArrayFromImage(sitk.ReadImage(str(b)))))


def _register_kills(argv_for, reference: Path, kills: int, seconds: float, rng, work: Path, tag: str) -> dict:
    """``cyclereg register`` (``argv_for(out)``) killed ``kills`` times at random in the second half of its
    run; the outputs left must each equal the reference's."""
    killed = partial = complete_sets = leftovers = 0
    for i in range(kills):
        out = work / f"{tag}{i}"
        out.mkdir()
        proc = subprocess.Popen(argv_for(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        try:
            proc.wait(timeout=rng.uniform(0.5 * seconds, seconds))
        except subprocess.TimeoutExpired:
            proc.kill()
            killed += 1
            proc.wait()
        for stale in out.glob(".*"):  # the temporary file of a write cut short: hidden, never under an output name
            stale.unlink()
            leftovers += 1
        present, ok = _outputs_equal(out, reference)
        partial += not ok
        complete_sets += present == 3
        shutil.rmtree(out)
    return {"killed": killed, "partial": partial, "complete": complete_sets, "leftovers": leftovers}


def _batch_argv(model: Path, pairs_csv: Path, out: Path) -> list:
    return [*CLI, "register", "--model", str(model), "--pairs-csv", str(pairs_csv), "--out-dir", str(out),
            "--outputs", "warped,transform"]


def _snapshot(out: Path) -> dict:
    """Output name -> (inode, modification time) of the complete pairs' files (both outputs there)."""
    files = {p.name: p.stat() for p in out.glob("*.nii.gz")} | {p.name: p.stat() for p in out.glob("*.h5")}
    done = {n[: -len("_warped.nii.gz")] for n in files if n.endswith("_warped.nii.gz")}
    done &= {n[: -len("_transform.h5")] for n in files if n.endswith("_transform.h5")}
    return {n: (st.st_ino, st.st_mtime_ns) for n, st in files.items() if n.rsplit("_", 1)[0] in done}


def _batch(model: Path, images: Path, n_pairs: int, kills: int, rng, work: Path, startup: float) -> dict:
    """A batch of ``n_pairs`` killed ``kills`` times at random and rerun until it completes, against an
    uninterrupted batch: outputs equal, and no complete pair written again."""
    rs = np.random.default_rng(1)
    rows = ["fixed,moving,name"]
    for i in range(n_pairs):
        for side in ("f", "m"):
            array = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rs.random((48, 48)).astype(np.float32)), 3.0)
            sitk.WriteImage(array, str(images / f"{side}{i}.nii.gz"))
        rows.append(f"f{i}.nii.gz,m{i}.nii.gz,pair{i:02d}")
    pairs_csv = images / "pairs.csv"
    pairs_csv.write_text("\n".join(rows) + "\n")
    reference = work / "batch_reference"
    t0 = time.monotonic()
    subprocess.run(_batch_argv(model, pairs_csv, reference), check=True, env=ENV, capture_output=True)
    seconds = time.monotonic() - t0
    out = work / "batch"
    made = reruns = rewritten = 0
    while True:
        before = _snapshot(out) if out.exists() else {}
        proc = subprocess.Popen(_batch_argv(model, pairs_csv, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=ENV)
        reruns += 1
        if made < kills:  # after 0 to 3 more pairs are complete, at a random moment of the next one
            target = len(before) // 2 + rng.randint(0, 3)
            while proc.poll() is None and len(_snapshot(out)) // 2 < target:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, (seconds - startup) / n_pairs))
            if proc.poll() is None:
                proc.kill()
                made += 1
        _, err = proc.communicate()
        after = _snapshot(out)
        rewritten += sum(after.get(name) != stamp for name, stamp in before.items())
        if proc.returncode == 0:
            break
        if proc.returncode > 0:
            raise SystemExit(f"batch rerun failed: {err.strip()[-300:]}")
    names = sorted(p.name for p in reference.iterdir() if not p.name.startswith("."))
    equal = (sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == names
             and all(_same(out / name, reference / name) for name in names))
    return {"pairs": n_pairs, "seconds": seconds, "kills": made, "runs": reruns, "rewritten": rewritten, "equal": equal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="stop after this long (default: %(default)s)")
    parser.add_argument("--kills", type=int, default=None, help="stop the training part after this many kills")
    parser.add_argument("--register-kills", type=int, default=20, help="kills of cyclereg register (default: %(default)s)")
    parser.add_argument("--batch-pairs", type=int, default=50, help="pairs of the killed batch (default: %(default)s)")
    parser.add_argument("--batch-kills", type=int, default=10, help="kills of the batch (default: %(default)s)")
    parser.add_argument("--shipped", action="store_true", help="also kill register with the shipped model on real brains")
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
        while True:
            before = _log_size(out)
            proc = _train(config, out, resume=True)
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
            if not (out / "checkpoint.pt").exists():  # killed before the first checkpoint: --resume starts at 0
                restarts += 1
            else:
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
    small = _register_kills(lambda out: _register_argv(model, images / "fixed.nii.gz", images / "moving.nii.gz", out),
                            ref_out, args.register_kills, register_seconds, rng, work, "register")
    shipped = None
    if args.shipped:
        from cyclereg.models.shipped import default_model

        brains = Path(__file__).resolve().parents[2] / "shared" / "data" / "brains"
        if default_model() is None or not brains.is_dir():
            raise SystemExit("--shipped: no shipped model, or no ../shared/data/brains")
        fixed, moving = brains / "fs01_t1.nii.gz", brains / "fs02_t1.nii.gz"
        shipped_argv = lambda out: [*CLI, "register", "--fixed", str(fixed), "--moving", str(moving),  # noqa: E731
                                    "--warped", str(out / "warped.nii.gz"), "--transform", str(out / "transform.h5"),
                                    "--jacobian", str(out / "jacobian.nii.gz")]
        shipped_ref = work / "shipped_reference"
        shipped_ref.mkdir()
        t0 = time.monotonic()
        subprocess.run(shipped_argv(shipped_ref), check=True, env=ENV, capture_output=True)
        shipped_seconds = time.monotonic() - t0
        shipped = _register_kills(shipped_argv, shipped_ref, max(1, args.register_kills // 2), shipped_seconds, rng,
                                  work, "shipped")
    batch = _batch(model, images, args.batch_pairs, args.batch_kills, rng, work, register_seconds) if args.batch_kills else None
    shutil.rmtree(work)

    rows = [("training runs", runs), ("kill -9 during training", kills), ("SIGTERM during training", terms),
            ("restarts with --resume from a checkpoint", resumes),
            ("restarts with --resume before the first checkpoint (start at step 0)", restarts),
            ("runs bit-identical to the uninterrupted run", f"{identical} of {runs}"),
            ("cyclereg register (affine + model) killed (kill -9)", f"{small['killed']} of {args.register_kills}"),
            ("register outputs differing from the reference or partial", small["partial"]),
            ("register runs that left all 3 outputs", small["complete"]),
            ("hidden temporary files left by killed writes", small["leftovers"])]
    if shipped:
        rows += [("register with the shipped model (fs02 to fs01) killed", shipped["killed"]),
                 ("its outputs differing from the reference or partial", shipped["partial"]),
                 ("its runs that left all 3 outputs", shipped["complete"])]
    if batch:
        rows += [(f"register --pairs-csv of {batch['pairs']} pairs ({batch['seconds']:.1f} s): kills", batch["kills"]),
                 ("batch runs until complete (same command line)", batch["runs"]),
                 ("batch outputs equal to an uninterrupted batch", "yes" if batch["equal"] else "NO"),
                 ("complete pairs written again by a rerun", batch["rewritten"])]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if args.append:
        if not args.kills and not args.register_kills:  # the batch alone
            append_report("Soak: a register --pairs-csv batch killed and rerun (issue 20)",
                          f"`python benchmarks/soak.py --kills 0 --register-kills 0 --batch-pairs {args.batch_pairs} "
                          f"--batch-kills {args.batch_kills}`: killed after 0 to 3 more pairs were complete, at a random "
                          "moment of the next, and rerun with the same command line until complete.\n\n"
                          + "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows[-4:]))
            return 0 if batch["equal"] and batch["rewritten"] == 0 else 1
        append_report("Soak: kill and resume (issues 6, 20)",
                      f"`python benchmarks/soak.py --seed {args.seed}{f' --kills {args.kills}' if args.kills else ''} "
                      f"--register-kills {args.register_kills}`: a 120-step GradICON run on 24×24 triangles "
                      f"({run_seconds:.1f} s uninterrupted, {train_seconds:.1f} s of it training; checkpoint every 10 steps), "
                      f"killed at a uniformly random moment of its training and started again with the same command line "
                      f"(`--resume`) until done (each restart may be killed again); `cyclereg register` ({register_seconds:.1f} s, "
                      f"affine stage and model) killed at random in the second half of its run; a `register --pairs-csv` "
                      f"batch killed at random and rerun until complete.\n\n" + table)
    ok = identical == runs and small["partial"] == 0 and (not shipped or shipped["partial"] == 0)
    return 0 if ok and (not batch or (batch["equal"] and batch["rewritten"] == 0)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
