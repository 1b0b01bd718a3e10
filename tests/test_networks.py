"""Registration networks (cyclereg.models.networks)."""

import pytest
import torch

from cyclereg.losses import mse
from cyclereg.models.networks import NETWORKS, build_network
from cyclereg.core.transforms import DisplacementField, warp

from conftest import smooth_image

# Small widths keep the suite fast; the defaults are exercised once below. A network added to
# NETWORKS later is tested with its default parameters.
_PARAMS = {"unet": {"channels": [4, 8, 8]}, "mlp": {"hidden": 32}, "encdec": {"channels": [4, 4, 8, 8, 8]},
           "convonly": {"growth": 4}}
PARAMS = {name: _PARAMS.get(name, {}) for name in NETWORKS}
SHAPES = {2: [(16, 16), (15, 13)], 3: [(8, 8, 8), (7, 9, 5)]}


def _cases():
    for name in NETWORKS:
        for d, shapes in SHAPES.items():
            for shape in shapes:
                yield pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("name,shape", list(_cases()))
def test_untrained_network_predicts_the_identity(name, shape):
    d = len(shape)
    net = build_network(name, d, shape, **PARAMS[name])
    pair = torch.cat([smooth_image(shape, n=2, seed=1), smooth_image(shape, n=2, seed=2)], 1)
    for mode in (True, False):  # batch norm in training and evaluation mode
        net.train(mode)
        out = net(pair)
        assert out.shape == (2, d, *shape)
        assert out.dtype == torch.float32
        assert torch.all(out == 0)


@pytest.mark.parametrize("name", [n for n in NETWORKS if n != "mlp"])
def test_default_widths_build_and_predict_the_identity(name):
    net = build_network(name, 2, None)
    out = net(torch.randn(2, 2, 15, 13))
    assert out.shape == (2, 2, 15, 13) and torch.all(out == 0)


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("shape", [(15, 13), (7, 9, 5)], ids=["2d", "3d"])
def test_gradients_reach_every_parameter(name, shape):
    """The zero last layer blocks gradients to earlier layers on the first step only: after one
    optimiser step every parameter receives a gradient and the prediction is no longer zero."""
    d = len(shape)
    net = build_network(name, d, shape, **PARAMS[name])
    moving = smooth_image(shape, n=2, seed=1)
    fixed = smooth_image(shape, n=2, seed=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)

    def loss():
        field = net(torch.cat([moving, fixed], 1))
        return mse(warp(moving, DisplacementField(field)), fixed).mean() + 1e-3 * field.pow(2).mean()

    first = loss()
    first.backward()
    out_params = [p for n, p in net.named_parameters() if n.startswith("out.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in out_params)
    opt.step()
    opt.zero_grad()
    loss().backward()
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    assert net(torch.cat([moving, fixed], 1)).abs().max() > 0


def test_mlp_needs_and_checks_its_shape():
    with pytest.raises(ValueError, match="mlp"):
        build_network("mlp", 2, None)
    net = build_network("mlp", 2, (8, 8), hidden=16)
    with pytest.raises(ValueError, match="MLP"):
        net(torch.zeros(1, 2, 8, 9))


def test_build_network_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown network 'resnet'.*convonly.*unet"):
        build_network("resnet", 2, (8, 8))


def test_build_network_passes_parameters():
    net = build_network("unet", 2, None, channels=[4, 8])
    assert len(net.down) == 2
    with pytest.raises(TypeError):
        build_network("unet", 2, None, widths=[4, 8])
