"""The benchmark harness (benchmarks/common.py): every run goes to the history, and BENCHMARKS.md is
rewritten with the latest run of each benchmark, its rows dated. Runs without reference packages:

    .venv/bin/python -m pytest benchmarks/test_common.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TABLE = "| a | b |\n|---|---|\n| {} | {} |\n"


def test_latest_run_per_benchmark_with_dated_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_COMMIT_AT_START", "abc1234")
    results = tmp_path / "BENCHMARKS.md"
    common.append_report("First (benchmarks/x.py)", TABLE.format(1, 2), results)
    common.append_report("Second (benchmarks/y.py)", TABLE.format(3, 4), results)
    common.append_report("First (benchmarks/x.py)", TABLE.format(5, 6), results)
    history = (tmp_path / "benchmarks" / "history.md").read_text()
    assert history.count("## First") == 2 and history.count("## Second") == 1  # nothing is lost
    current = results.read_text()
    assert current.count("## First") == 1 and current.count("## Second") == 1
    assert current.index("## First") < current.index("## Second")  # the order benchmarks first appeared in
    assert "| 5 | 6 |" in current and "| 1 | 2 |" not in current  # the latest run
    assert "| a | b | date | commit |" in current and "|---|---|---|---|" in current
    assert "| 5 | 6 | 20" in current and "| abc1234 |" in current
