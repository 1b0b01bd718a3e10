"""Shared fixtures: one test body for 2D and 3D, small smooth images, tiny configs.

The suite runs on a couple of CPU cores that may be shared with a training run: PyTorch is held to
one thread (with two threads under contention, small convolutions run about 30 times slower).
Set ``CYCLEREG_TEST_THREADS`` to change that.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from cyclereg.core.coords import identity_grid

torch.set_num_threads(int(os.environ.get("CYCLEREG_TEST_THREADS", "1")))

# Non-square on purpose: a swapped axis or component order changes shapes or values.
SHAPES = {2: (12, 9), 3: (8, 7, 6)}


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def dim(request) -> int:
    """The spatial dimension; tests taking it run once in 2D and once in 3D."""
    return request.param


def small_shape(dim: int) -> tuple:
    """A small non-square image shape for ``dim``."""
    return SHAPES[dim]


@pytest.fixture
def shape(dim) -> tuple:
    return small_shape(dim)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def smooth_image(shape, n: int = 1, seed: int = 0, dtype=torch.float32, channels: int = 1,
                 waves: int = 4) -> torch.Tensor:
    """``(n, channels, *shape)`` smooth random images: sums of a few low-frequency sinusoids of the
    ``[0, 1]`` domain coordinates (values roughly in ``[-1, 1]``), seeded."""
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    x = identity_grid(shape, dtype=torch.float64)  # (1, d, *shape)
    out = torch.zeros((n, channels, *shape), dtype=torch.float64)
    for _ in range(waves):
        freq = (torch.rand(n, channels, d, generator=g, dtype=torch.float64) * 2 - 1) * 2.0  # cycles per domain
        phase = torch.rand(n, channels, generator=g, dtype=torch.float64) * 2 * math.pi
        amp = 0.5 + 0.5 * torch.rand(n, channels, generator=g, dtype=torch.float64)
        arg = torch.einsum("ncd,d...->nc...", freq, x[0]) * 2 * math.pi
        out += amp.view(n, channels, *([1] * d)) * torch.sin(arg + phase.view(n, channels, *([1] * d)))
    return (out / waves).to(dtype)


def smooth_field(shape, n: int = 1, seed: int = 0, voxels: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """A smooth random displacement field ``(n, d, *shape)`` of about ``voxels`` voxels, in domain units."""
    d = len(shape)
    field = smooth_image(shape, n, seed, torch.float64, channels=d, waves=3)
    scale = torch.tensor([1.0 / max(s - 1, 1) for s in shape], dtype=torch.float64).view(1, d, *([1] * d))
    return (field * voxels * scale).to(dtype)


def translation(shape, voxels, n: int = 1, dtype=torch.float32) -> torch.Tensor:
    """A constant displacement field ``(n, d, *shape)`` moving points by ``voxels[k]`` voxels along axis k."""
    d = len(shape)
    t = torch.tensor([v / (s - 1) for v, s in zip(voxels, shape)], dtype=dtype).view(1, d, *([1] * d))
    return t.expand(n, d, *shape).clone()


def tiny_config_dict(**overrides) -> dict:
    """A triangles config small enough to train in a few seconds on one CPU core."""
    raw = {
        "data": {"dataset": "triangles", "size": 16, "n_train": 40, "val_pairs": 4},
        "model": {"method": "icon", "similarity": "mse", "lam": 64.0,
                  "steps": [{"network": "unet", "params": {"channels": [4, 8]}}]},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "val_every": 1000,
                  "checkpoint_every": 2},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def write_toml(path, raw: dict):
    """Write a config dictionary as a TOML file (lists of tables, such as ``model.steps``, as ``[[...]]``)."""
    lines = []
    for section, values in raw.items():
        tables = {k: v for k, v in values.items() if isinstance(v, list) and v and all(isinstance(t, dict) for t in v)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in tables]
        for key, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def rand_points(n: int, dim: int, extra=(5, 4, 3), dtype=torch.float64, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Uniform random points ``(n, d, *extra[:d])`` in ``[low, high]`` (a point layout of ``d`` axes,
    as grid_sample needs)."""
    return low + (high - low) * torch.rand(n, dim, *extra[:dim], dtype=dtype)


def random_two_step_model(dim, shape, std=0.02):
    """A two-step model in evaluation mode, the first step downsampled 2, with random weights of
    standard deviation ``std`` (``std=0``: the identity map)."""
    from cyclereg.models.registration import build_model

    model = build_model([{"network": "unet", "downsample": 2, "params": {"channels": [8, 16]}},
                         {"network": "unet", "params": {"channels": [8, 16]}}], dim, shape).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, std)
    return model
