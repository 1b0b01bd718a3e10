"""Shared helpers for the benchmarks: machine description and appending to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_COMMIT_AT_START = commit()  # the code that runs is the code at start, whatever is edited meanwhile


def append_report(title: str, body: str, path: Path | None = None) -> None:
    """Append a dated section (machine, commit at the script's start) to BENCHMARKS.md (or to the file
    named by ``CYCLEREG_BENCHMARKS``, for a benchmark run from a separate clone of the repository)."""
    path = Path(path or os.environ.get("CYCLEREG_BENCHMARKS") or ROOT / "BENCHMARKS.md")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {title}\n\n{stamp}; {machine()}; commit {_COMMIT_AT_START}\n\n{body.rstrip()}\n"
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by the scripts in `benchmarks/`; never edited by hand.\n")
    with path.open("a") as f:
        f.write(section)


def train_and_score(raw_config: dict, pairs: int = 200, split_seed: int = 1):
    """Train a config (nested dict) in a temporary folder and score it on held-out pairs.

    Returns ``(metrics, model, info, (moving, fixed))`` with ``metrics`` holding the evaluation
    summary plus ``seconds_per_step`` (training wall time over steps, validation excluded).
    """
    import json
    import tempfile
    import time

    from cyclereg.core.config import config_from_dict
    from cyclereg.data.datasets import dataset_images, fixed_pairs
    from cyclereg.evaluation.scores import score_pairs, summarise
    from cyclereg.models.modelfile import load_model
    from cyclereg.training.train import train

    raw = json.loads(json.dumps(raw_config))
    raw.setdefault("train", {})["val_every"] = 10**9
    cfg = config_from_dict(raw)
    split = "heldout" if cfg.data.dataset == "mnist" else "test"
    moving, fixed = fixed_pairs(dataset_images(cfg.data, split, n_test=2 * pairs), pairs, seed=split_seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = train(cfg, tmp, progress=False)
        seconds = time.perf_counter() - t0
        model, info = load_model(path)
    metrics = summarise(score_pairs(model, moving, fixed), info.shape)
    metrics["seconds_per_step"] = seconds / cfg.train.steps
    return metrics, model, info, (moving, fixed)
