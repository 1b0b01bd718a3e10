"""Registration networks, chosen by name from :data:`NETWORKS`.

Every network takes the pair ``(moving, fixed)`` concatenated into ``(N, 2, *spatial)`` and returns
a displacement field ``(N, d, *spatial)`` in voxels of its input grid (:class:`cyclereg.models.registration.Step`
turns it into the domain units of :mod:`cyclereg.core.coords`). The last
layer is zero-initialised, so an untrained network predicts the identity map. One class serves 2D
and 3D: the dimension picks the layer types.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cyclereg.core.transforms import resize

__all__ = ["UNet", "MLP", "EncDec", "ConvOnly", "VoxelMorphUNet", "NETWORKS", "build_network"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _zero_output(conv: nn.Module) -> nn.Module:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _ConvNormAct(nn.Sequential):
    def __init__(self, dim, cin, cout, stride=1):
        super().__init__(_CONV[dim](cin, cout, 3, stride=stride, padding=1, bias=False), _NORM[dim](cout),
                         nn.LeakyReLU(0.2, inplace=True))


class _Residual(nn.Module):
    def __init__(self, dim, channels):
        super().__init__()
        self.body = _ConvNormAct(dim, channels, channels)

    def forward(self, x):
        return x + self.body(x)


class UNet(nn.Module):
    """U-Net with skip and residual connections, LeakyReLU and batch norm (the ICON paper's U-Net).

    ``channels[i]`` is the width at ``1 / 2**(i+1)`` of the input resolution: every level halves the
    size with a strided convolution followed by a residual block; the decoder upsamples, joins the
    skip connection of its level and convolves. At full resolution only the last layer runs (on the
    upsampled features and the input pair), which keeps the network fast on large images.
    """

    def __init__(self, dim: int, shape=None, channels=(16, 32, 64, 128)):
        super().__init__()
        channels = list(channels)
        widths = [2] + channels
        self.down = nn.ModuleList(
            nn.Sequential(_ConvNormAct(dim, cin, cout, stride=2), _Residual(dim, cout))
            for cin, cout in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(
            _ConvNormAct(dim, deep + skip, skip) for skip, deep in zip(channels[:-1], channels[1:]))
        self.out = _zero_output(_CONV[dim](channels[0] + 2, dim, 3, padding=1))

    def forward(self, x):
        skips = [x]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        for block, skip in zip(reversed(self.up), reversed(skips[1:])):
            y = block(torch.cat([resize(y, skip.shape[2:]), skip], 1))
        return self.out(torch.cat([resize(y, x.shape[2:]), x], 1))


class MLP(nn.Module):
    """Two hidden layers with ReLU on the flattened pair; fixed image ``shape``."""

    def __init__(self, dim: int, shape, hidden: int = 1024):
        super().__init__()
        if shape is None:
            raise ValueError("network 'mlp' needs a fixed input shape")
        self.shape = tuple(shape)
        n = math.prod(self.shape)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * n, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.out = _zero_output(nn.Linear(hidden, dim * n))
        self.dim = dim

    def forward(self, x):
        if tuple(x.shape[2:]) != self.shape:
            raise ValueError(f"MLP: built for images of shape {self.shape}, got {tuple(x.shape[2:])}")
        return self.out(self.body(x)).view(x.shape[0], self.dim, *self.shape)


class EncDec(nn.Module):
    """Encoder-decoder with five stride-2 layers down and five up, no skip connections."""

    def __init__(self, dim: int, shape=None, channels=(16, 32, 64, 128, 256)):
        super().__init__()
        channels = list(channels)
        widths = [2] + channels
        self.down = nn.ModuleList(nn.Sequential(_CONV[dim](a, b, 3, stride=2, padding=1), nn.ReLU(inplace=True))
                                  for a, b in zip(widths[:-1], widths[1:]))
        rev = channels[::-1] + [channels[0]]
        self.up = nn.ModuleList(nn.Sequential(_CONV[dim](a, b, 3, padding=1), nn.ReLU(inplace=True))
                                for a, b in zip(rev[:-1], rev[1:]))
        self.out = _zero_output(_CONV[dim](channels[0], dim, 3, padding=1))

    def forward(self, x):
        sizes = []
        for block in self.down:
            sizes.append(x.shape[2:])
            x = block(x)
        for block, size in zip(self.up, reversed(sizes)):
            x = block(resize(x, size))
        return self.out(x)


class ConvOnly(nn.Module):
    """Six densely connected convolutions at full resolution (each sees all earlier outputs)."""

    def __init__(self, dim: int, shape=None, growth: int = 16, layers: int = 6):
        super().__init__()
        self.hidden = nn.ModuleList(
            nn.Sequential(_CONV[dim](2 + i * growth, growth, 3, padding=1), nn.ReLU(inplace=True))
            for i in range(layers - 1))
        self.out = _zero_output(_CONV[dim](2 + (layers - 1) * growth, dim, 3, padding=1))

    def forward(self, x):
        features = [x]
        for layer in self.hidden:
            features.append(layer(torch.cat(features, 1)))
        return self.out(torch.cat(features, 1))


class VoxelMorphUNet(nn.Module):
    """The small VoxelMorph-style U-Net of CycleMorph: encoder widths ``encoder`` (the first at full
    resolution, each later one halving it), decoder widths ``decoder`` (upsampling and joining the
    skip of each level until full resolution, then the remaining ones at full resolution)."""

    def __init__(self, dim: int, shape=None, encoder=(16, 32, 32, 32, 32), decoder=(32, 32, 32, 8, 8)):
        super().__init__()
        encoder, decoder = list(encoder), list(decoder)
        conv = _CONV[dim]
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        widths = [2] + encoder
        self.down = nn.ModuleList(nn.Sequential(conv(a, b, 3, stride=1 if i == 0 else 2, padding=1), act())
                                  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        levels = len(encoder) - 1  # number of upsamplings back to full resolution
        if len(decoder) < levels:
            raise ValueError(f"VoxelMorphUNet: need at least {levels} decoder widths, got {decoder}")
        self.up = nn.ModuleList()
        cin = encoder[-1]
        for i, cout in enumerate(decoder):
            skip = encoder[levels - 1 - i] if i < levels else 0
            self.up.append(nn.Sequential(conv(cin + skip, cout, 3, padding=1), act()))
            cin = cout
        self.levels = levels
        self.out = _zero_output(conv(cin, dim, 3, padding=1))

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        y = skips.pop()
        for i, block in enumerate(self.up):
            if i < self.levels:
                skip = skips.pop()
                y = torch.cat([resize(y, skip.shape[2:]), skip], 1)
            y = block(y)
        return self.out(y)


NETWORKS = {"unet": UNet, "mlp": MLP, "encdec": EncDec, "convonly": ConvOnly, "voxelmorph": VoxelMorphUNet}


def build_network(name: str, dim: int, shape=None, **params) -> nn.Module:
    """Build the network called ``name`` for ``dim``-D images of ``shape`` (needed by ``mlp``)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {sorted(NETWORKS)}")
    return NETWORKS[name](dim, shape, **params)
