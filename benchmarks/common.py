"""The benchmarks' shared harness: machine description, commit, and the record of every run (the history,
``benchmarks/history.md``) from which the current results, ``BENCHMARKS.md``, are rewritten."""

from __future__ import annotations

import datetime
import os
import platform
import re
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
        # the results files themselves do not count: runs one after another record the same commit
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md",
                                ":!benchmarks/history.md"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_COMMIT_AT_START = commit()  # the code that runs is the code at start, whatever is edited meanwhile


HEADER = ("# Benchmarks: current results\n\nThe latest run of each benchmark, written by `benchmarks/common.py` from the "
          "log of every run, `benchmarks/history.md`; never edited by hand. Every table row carries the date and "
          "commit of the run it comes from. Runs dated before 2026-12-01 predate the losses' alignment with the "
          "authors' (issue 17): their GradICON term was 2d times icon_registration's, so their λ are not today's.\n")
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}) \d{2}:\d{2} UTC; .*; commit (\S+)$")


def append_report(title: str, body: str, path: Path | None = None) -> None:
    """Record a run: append a dated section (machine, commit at the script's start) to the history
    (``benchmarks/history.md`` beside the results file), then rewrite the results file (``BENCHMARKS.md``,
    or the file named by ``CYCLEREG_BENCHMARKS`` for a run from a separate clone) from it."""
    results = Path(path or os.environ.get("CYCLEREG_BENCHMARKS") or ROOT / "BENCHMARKS.md")
    history = results.parent / "benchmarks" / "history.md"
    history.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not history.exists():
        history.write_text("# Benchmark history\n\nEvery run of the scripts in `benchmarks/`, appended; never edited by hand.\n")
    with history.open("a") as f:
        f.write(f"\n## {title}\n\n{stamp}; {machine()}; commit {_COMMIT_AT_START}\n\n{body.rstrip()}\n")
    write_current(history, results)


def _sections(text: str) -> list[tuple[str, str]]:
    """``(title, section)`` of every ``## `` section of a history, in order."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return [(part.split("\n", 1)[0].strip(), "## " + part.rstrip() + "\n") for part in parts]


def _dated_rows(section: str) -> str:
    """The section with ``date`` and ``commit`` columns added to each of its tables' rows."""
    lines = section.splitlines()
    date = commit = "?"
    for line in lines:
        if (m := _STAMP.match(line)):
            date, commit = m.groups()
            break
    out = []
    for i, line in enumerate(lines):
        table = line.startswith("|") and line.rstrip().endswith("|")
        if not table:
            out.append(line)
        elif set(line.replace("|", "").strip()) <= set("-: "):  # the separator under a header
            out.append(line + "---|---|")
        elif i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: ") and lines[i + 1].startswith("|"):
            out.append(line + " date | commit |")  # a header row
        else:
            out.append(line + f" {date} | {commit} |")
    return "\n".join(out) + "\n"


def write_current(history: Path, results: Path) -> None:
    """Rewrite ``results`` from ``history``: for each benchmark (section title), its latest run, in the
    order the benchmarks first appeared."""
    sections = _sections(history.read_text())
    latest = dict(sections)  # a later run of a benchmark replaces the earlier ones
    body = "\n".join(_dated_rows(latest[title]) for title in dict.fromkeys(t for t, _ in sections))
    tmp = results.with_name(results.name + ".tmp")
    tmp.write_text(HEADER + "\n" + body)
    tmp.replace(results)


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
