"""Training options: batches prepared by worker threads, the scan cache, gradient checkpointing and
bfloat16 autocast."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from cyclereg.core.config import config_from_dict
from cyclereg.data.datasets import training_data
from cyclereg.training.loader import Loader, make_batch, pair_seed
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.models.registration import build_model

from conftest import smooth_image, tiny_config_dict


def test_batches_depend_only_on_seed_step_and_pair():
    data = training_data(config_from_dict(tiny_config_dict()).data)
    with Loader(data, 5, 4, 0, 1, 0, 6, workers=0) as inline, Loader(data, 5, 4, 0, 1, 0, 6, workers=3, ahead=5) as threads:
        for step in range(6):
            a, b = inline.next(), threads.next()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert torch.equal(a[0], make_batch(data, 5, step, range(4))[0])
    assert not torch.equal(make_batch(data, 5, 0, range(4))[0], make_batch(data, 5, 1, range(4))[0])
    assert len({pair_seed(0, s, i) for s in range(50) for i in range(50)}) == 2500


def test_resume_from_a_middle_step_sees_the_same_batches():
    data = training_data(config_from_dict(tiny_config_dict()).data)
    with Loader(data, 0, 3, 0, 1, 0, 10) as full, Loader(data, 0, 3, 0, 1, 7, 10) as resumed:
        batches = [full.next() for _ in range(10)]
        for step in range(7, 10):
            assert torch.equal(resumed.next()[0], batches[step][0])


def test_scan_cache_is_reused_and_gives_the_same_images(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        image = sitk.GetImageFromArray(smooth_image((10, 12, 14), seed=i)[0, 0].numpy())
        image.SetSpacing((1.0, 1.2, 0.9))
        sitk.WriteImage(image, str(scans / f"s{i}.nii.gz"))
    raw = {"data": {"dataset": "folder", "root": str(scans), "deform": 1.0, "val_pairs": 2}}
    plain = training_data(config_from_dict(raw).data)
    raw["data"]["cache"] = str(tmp_path / "cache")
    first = training_data(config_from_dict(raw).data)
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = training_data(config_from_dict(raw).data)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read back, not written again
    for a, b, c in zip(plain.images, first.images, again.images):
        assert torch.equal(a, b) and torch.equal(a, c)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(plain.pair(g())[0], again.pair(g())[0])
    (scans / "s0.nii.gz").touch()  # a changed scan is prepared again
    training_data(config_from_dict(raw).data)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


def _grads_and_stats(checkpointing: bool, dim: int = 2):
    shape = (16, 16) if dim == 2 else (8, 8, 8)
    torch.manual_seed(0)
    model = build_model([{"network": "unet", "params": {"channels": [4, 8]}}], dim, shape, method="gradicon")
    with torch.no_grad():  # a non-zero output layer, so every gradient is non-zero
        model.steps[0].network.out.weight.normal_(0, 1e-2) if hasattr(model.steps[0].network, "out") else None
    model.train()
    model.checkpointing(checkpointing)
    moving, fixed = smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)
    torch.manual_seed(1)
    loss, _ = loss_terms(model, moving, fixed, LossSettings("gradicon", "mse", 1.0))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return loss.detach(), grads, stats


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_running_stats(dim):
    loss_a, grads_a, stats_a = _grads_and_stats(False, dim)
    loss_b, grads_b, stats_b = _grads_and_stats(True, dim)
    torch.testing.assert_close(loss_b, loss_a)
    assert stats_a and all(torch.equal(stats_a[k], stats_b[k]) for k in stats_a)  # updated once, not twice
    assert any(g.abs().max() > 0 for g in grads_a.values())
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-7)


def test_bfloat16_and_checkpointing_train_through_the_command_line(tmp_path):
    from cyclereg.training.train import train

    raw = tiny_config_dict(train__steps=3)
    raw["train"].update(precision="bfloat16", checkpointing=True, workers=1)
    path = train(config_from_dict(raw), tmp_path / "run", progress=False, device="cpu")
    assert path.is_file()
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert all(r["data_wait"] >= 0 for r in records if "loss" in r)


def test_training_starts_from_a_model_file_and_resume_keeps_the_checkpoint(tmp_path):
    """``train.init``: a one-step model starts step 0 of a two-step model; with step 0 frozen, the
    trained model's step 0 is the init model's, while step 1 trains. ``--resume`` continues from the
    checkpoint, not from the init model."""
    from cyclereg.models.modelfile import load_model
    from cyclereg.training.train import train

    first = train(config_from_dict(tiny_config_dict(train__steps=3)), tmp_path / "one", progress=False, device="cpu")
    raw = tiny_config_dict(train__steps=4)
    raw["model"]["steps"] = raw["model"]["steps"] * 2
    raw["train"].update(init=str(first), stages=[{"fraction": 1.0, "train": [1]}])
    two = train(config_from_dict(raw), tmp_path / "two", progress=False, device="cpu")
    one_model, _ = load_model(first)
    two_model, _ = load_model(two)
    state = two_model.state_dict()
    for name, value in one_model.state_dict().items():
        assert torch.equal(state[name], value), name
    assert any(state[k].abs().max() > 0 for k in state if k.startswith("steps.1.network.out"))  # step 1 trained
    raw["train"]["steps"] = 6
    resumed = train(config_from_dict(raw), tmp_path / "two", resume=True, progress=False, device="cpu")
    assert load_model(resumed)[1].training["steps"] == 6


def test_learning_rate_schedule_per_stage():
    from cyclereg.training.train import learning_rate, stage_schedule

    raw = tiny_config_dict()
    raw["model"]["steps"] = [{"network": "unet"}, {"network": "unet"}]
    raw["train"].update(steps=100, lr=1e-3, stages=[{"fraction": 0.6, "train": [0]}, {"fraction": 0.4, "train": [1]}])
    cfg = config_from_dict(raw)
    stages = stage_schedule(cfg)
    assert [learning_rate(cfg, stages, s) for s in (0, 59, 60, 99)] == [1e-3] * 4  # constant by default
    raw["train"].update(lr_schedule="cosine", warmup=10)
    cfg = config_from_dict(raw)
    lrs = [learning_rate(cfg, stages, s) for s in range(100)]
    assert lrs[0] == 1e-4 and lrs[9] == 1e-3  # linear warm-up at the start of each stage
    assert lrs[60] == 1e-4 and lrs[69] == 1e-3
    first, second = lrs[9:60], lrs[69:]
    assert all(a >= b for a, b in zip(first, first[1:])) and all(a >= b for a, b in zip(second, second[1:]))
    assert lrs[59] < 0.01e-3 and lrs[99] < 0.01e-3  # decays towards 0 at each stage's end
