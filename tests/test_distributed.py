"""Training on two CPU processes with torchrun and DistributedDataParallel (gloo), against one process
with the doubled batch.

With a network without batch norm and a loss without random points (diffusion, MSE), two processes
with batch B compute exactly what one process computes with batch 2B: the same global batch, split;
gradients averaged. The only difference is the order of floating-point sums, so losses and weights
agree to 1e-5 (relative). With batch norm (the U-Net), each process normalises over its own half of
the batch, as DDP does without SyncBatchNorm, and the losses agree to a few percent instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config_dict, write_toml

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

def _config(tmp_path: Path, batch: int, method="diffusion", network="convonly", params=None, lam=0.5) -> Path:
    raw = tiny_config_dict(model__method=method, model__lam=lam, train__steps=6, train__batch_size=batch, train__lr=2e-3,
                           train__checkpoint_every=3)
    raw["model"]["steps"] = [{"network": network, "params": params or {"growth": 4, "layers": 3}}]
    return write_toml(tmp_path / f"{method}-{network}-b{batch}.toml", raw)


def _run(config: Path, out: Path, processes: int = 1, *extra: str) -> None:
    train = ["-m", "cyclereg", "train", str(config), "--out", str(out), "--quiet", "--device", "cpu", *extra]
    if processes > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *train]
    else:
        argv = [sys.executable, *train]
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _losses(out: Path) -> torch.Tensor:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in records if "loss" in r], dtype=torch.float64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _run(_config(root, 8), root / "single")
    _run(_config(root, 4), root / "ddp", 2)
    return root


def test_two_processes_equal_one_with_the_doubled_batch(runs):
    single, ddp = _losses(runs / "single"), _losses(runs / "ddp")
    assert len(single) == len(ddp) == 6
    torch.testing.assert_close(ddp, single, rtol=1e-5, atol=1e-7)
    a, b = load_file(str(runs / "single" / "model.safetensors")), load_file(str(runs / "ddp" / "model.safetensors"))
    assert any("out" in k and a[k].abs().max() > 1e-4 for k in a)  # the zero-initialised output layer has trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_one_log_one_checkpoint_one_model(runs):
    names = sorted(p.name for p in (runs / "ddp").iterdir())
    assert names == ["checkpoint.pt", "log.jsonl", "model.safetensors"]
    steps = [json.loads(line)["step"] for line in (runs / "ddp" / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    state = torch.load(runs / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["torch_rng_ranks"]) == 2
    assert not torch.equal(state["torch_rng_ranks"][0], state["torch_rng_ranks"][1])  # per-rank seeds


def test_resume_under_ddp_is_exact(runs, tmp_path):
    config = _config(runs, 4)
    _run(config, tmp_path / "run", 2, "--steps", "3")
    _run(config, tmp_path / "run", 2, "--resume")
    a, b = load_file(str(runs / "ddp" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_another_number_of_processes_is_refused(runs, tmp_path, capsys):
    from cyclereg.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((runs / "ddp" / "checkpoint.pt").read_bytes())
    code = main(["train", str(_config(runs, 4)), "--out", str(out), "--resume", "--quiet", "--device", "cpu"])
    assert code == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err


def test_batch_norm_unet_under_ddp_stays_close(tmp_path):
    """ICON with the U-Net (batch norm, random points per rank): close, not equal."""
    _run(_config(tmp_path, 8, "icon", "unet", {"channels": [4, 8]}, 64.0), tmp_path / "single")
    _run(_config(tmp_path, 4, "icon", "unet", {"channels": [4, 8]}, 64.0), tmp_path / "ddp", 2)
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert ((ddp - single).abs() / single.abs()).max() < 0.05, (single, ddp)


def test_ranks_draw_disjoint_parts_of_one_global_batch():
    from cyclereg.core.config import config_from_dict
    from cyclereg.data.datasets import training_data
    from cyclereg.training.loader import Loader

    from conftest import tiny_config_dict

    data = training_data(config_from_dict(tiny_config_dict()).data)
    with Loader(data, 0, 6, 0, 1, 3, 10, workers=0) as one:
        whole = one.next()
    parts = []
    for rank in range(3):
        with Loader(data, 0, 2, rank, 3, 3, 10, workers=2) as loader:
            parts.append(loader.next())
    assert torch.equal(torch.cat([m for m, _ in parts]), whole[0])
    assert torch.equal(torch.cat([f for _, f in parts]), whole[1])


def test_evaluate_splits_pairs_across_processes_and_reports_once(runs, tmp_path):
    import csv

    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for k in range(4):
        image = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
            sitk.GetImageFromArray(rng.random((16, 16)).astype(np.float32)), 2.0)))
        sitk.WriteImage(image, str(tmp_path / f"i{k}.nii.gz"))
    (tmp_path / "pairs.csv").write_text("fixed,moving\n" + "".join(f"i{k}.nii.gz,i{(k + 1) % 4}.nii.gz\n" for k in range(3)))
    model = runs / "ddp" / "model.safetensors"
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        out.mkdir()
        evaluate = ["-m", "cyclereg", "evaluate", "--model", str(model), "--pairs-csv", str(tmp_path / "pairs.csv"),
                    "--per-pair", str(out / "pairs.csv"), "--json", str(out / "summary.json"), "--device", "cpu"]
        argv = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *evaluate]
                if processes > 1 else [sys.executable, *evaluate])
        result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count('"n_pairs"') == 1  # one report, from rank 0
        with (out / "pairs.csv").open() as f:
            outputs[processes] = (list(csv.DictReader(f)), json.loads((out / "summary.json").read_text()))
    (rows1, sum1), (rows2, sum2) = outputs[1], outputs[2]
    assert [r["moving"] for r in rows2] == [r["moving"] for r in rows1]  # in the CSV's order
    for a, b in zip(rows1, rows2):
        assert float(a["dice"]) == pytest.approx(float(b["dice"]), abs=1e-6)
        assert float(a["ic_error_mm"]) == pytest.approx(float(b["ic_error_mm"]), rel=1e-4)
    assert sum1["n_pairs"] == sum2["n_pairs"] == 3 and sum1["dice"] == pytest.approx(sum2["dice"], abs=1e-6)
