"""``model.svf``: every step's network predicts a stationary velocity field, and the step's map is its
exponential (scaling and squaring), a diffeomorphism by construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cyclereg.data.augment import random_velocity
from cyclereg.core.config import config_from_dict
from cyclereg.core.errors import UsageError
from cyclereg.models.methods import loss_terms, settings_from_config
from cyclereg.models.registration import Step
from cyclereg.core.metrics import jacobian_determinant
from cyclereg.models.modelfile import ModelInfo, build_from_info, initialise_from, load_model, save_model
from cyclereg.io.preprocess import Preprocessing
from cyclereg.core.transforms import DisplacementField, map_on_grid

from conftest import tiny_config_dict


class Velocity(nn.Module):
    """A stand-in network whose output (voxels) is a fixed field."""

    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, pair):
        return self.field.expand(pair.shape[0], *self.field.shape[1:])


def _large_velocity(shape, seed=0):
    """Velocities large enough that, read as displacements, they fold (RMS 4 voxels in 2D, 3 in 3D on a
    16-voxel grid: scaling and squaring on a coarser grid with these folds by discretisation)."""
    g = torch.Generator().manual_seed(seed)
    v = random_velocity(1, shape, magnitude=4.0 if len(shape) == 2 else 3.0, smoothness=4, generator=g)
    scale = torch.tensor([n - 1 for n in shape], dtype=v.dtype).view(1, -1, *([1] * len(shape)))
    return v * scale  # in voxels, as a network predicts


def test_a_large_velocity_gives_no_folds_where_a_displacement_of_it_folds(dim):
    shape = (24, 20) if dim == 2 else (20, 18, 16)
    v = _large_velocity(shape)
    pair = torch.zeros(1, 2, *shape)
    svf = Step(Velocity(v), svf=True)(pair[:, :1], pair[:, 1:])
    plain = Step(Velocity(v))(pair[:, :1], pair[:, 1:])
    assert bool((jacobian_determinant(map_on_grid(svf, shape, pair)) > 0).all())
    assert bool((jacobian_determinant(map_on_grid(plain, shape, pair)) <= 0).any())  # the same field, read as a displacement


def test_exp_of_v_composed_with_exp_of_minus_v_is_nearly_the_identity(dim):
    shape = (24, 20) if dim == 2 else (20, 18, 16)
    v = _large_velocity(shape, seed=1)
    pair = torch.zeros(1, 2, *shape)
    forward = Step(Velocity(v), svf=True)(pair[:, :1], pair[:, 1:])
    backward = Step(Velocity(-v), svf=True)(pair[:, :1], pair[:, 1:])
    grid = map_on_grid(DisplacementField(torch.zeros(1, dim, *shape)), shape, pair)
    scale = torch.tensor([n - 1 for n in shape], dtype=v.dtype).view(1, -1, *([1] * dim))
    residual = ((forward @ backward).displacement(grid) * scale).norm(dim=1)
    assert float(residual.mean()) < 0.05 * float((forward.field * scale).norm(dim=1).mean())
    assert float(residual.mean()) < 0.2  # voxels


def test_config_svf_builds_velocity_steps_that_survive_a_model_file(tmp_path):
    cfg = config_from_dict(tiny_config_dict(model__svf=True, model__method="gradicon", model__lam=1.0))
    info = ModelInfo(cfg, (16, 16), Preprocessing(range=(-1.0, 1.0)))
    model = build_from_info(info)
    assert all(step.svf for step in model.steps)
    for p in model.parameters():
        nn.init.normal_(p, 0, 0.05)
    save_model(tmp_path / "m.safetensors", model, info)
    loaded, loaded_info = load_model(tmp_path / "m.safetensors")
    assert loaded_info.config.model.svf and all(step.svf for step in loaded.steps)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x.flip(-1)).field, model.eval()(x, x.flip(-1)).field, rtol=1e-4, atol=1e-6)
    total, _ = loss_terms(model.train(), x, x.flip(-1), settings_from_config(cfg.model))
    total.backward()  # the loss trains through the integration
    assert all(p.grad is not None for p in model.parameters())


def test_train_init_refuses_a_model_of_the_other_kind(tmp_path):
    plain = config_from_dict(tiny_config_dict())
    info = ModelInfo(plain, (16, 16), Preprocessing(range=(-1.0, 1.0)))
    save_model(tmp_path / "plain.safetensors", build_from_info(info), info)
    svf = config_from_dict(tiny_config_dict(model__svf=True))
    svf_info = ModelInfo(svf, (16, 16), Preprocessing(range=(-1.0, 1.0)))
    with pytest.raises(UsageError, match="model.svf is false there and true here"):
        initialise_from(build_from_info(svf_info), svf_info, tmp_path / "plain.safetensors")
