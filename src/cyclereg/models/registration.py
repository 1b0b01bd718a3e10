"""Registration models: a network as one step, a composition of steps, passes, and CycleMorph's pair
of models. A model is called as ``model(moving, fixed)`` and returns the transform ``Φ_AB`` with
``moving ∘ Φ_AB ≈ fixed`` (conventions: :mod:`cyclereg.core.coords`). A new network goes in
:mod:`cyclereg.models.networks`; how models are trained, in :mod:`cyclereg.models.methods`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cyclereg.core.coords import voxel_scale
from cyclereg.core.filters import gaussian_blur
from cyclereg.core.transforms import DisplacementField, Transform, exp_velocity, resize, warp
from cyclereg.models.networks import build_network

__all__ = ["downsample", "Step", "cascade", "RegistrationModel", "Passes", "CycleMorph", "forward_model", "split_steps",
           "coarse_view", "use_channels_last", "compile_networks", "build_model"]


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Smooth and resample ``(N, C, *spatial)`` to ``(n - 1) // factor + 1`` voxels per axis, keeping
    the corner voxels where they are, so the ``[0, 1]`` domain is unchanged."""
    if factor == 1:
        return images
    size = [(n - 1) // factor + 1 for n in images.shape[2:]]
    smooth = gaussian_blur(images, 0.5 * factor)
    return resize(smooth, size)


class Step(nn.Module):
    """One network predicting a displacement field, optionally on images downsampled by ``factor``
    (the field is then evaluated at full resolution by interpolation).

    The network's output is read in voxels of the grid it sees (``units="voxels"``) and turned into
    domain units here. A convolutional network sees shifts in voxels, so it then predicts the same
    field whatever the grid's extent: on a scan with a larger field of view, or on a patch
    (:mod:`cyclereg.models.multiscale`). It also keeps Adam's steps on the output layer small in domain
    units. ``units="domain"`` reads the output as domain units, as model files before format 3 did.

    With ``svf=True`` the output is a stationary velocity field and the step's map is its exponential
    (scaling and squaring, :func:`~cyclereg.core.transforms.exp_velocity`, on the grid the network sees):
    a diffeomorphism by construction, whose inverse is the exponential of the negated output."""

    def __init__(self, network: nn.Module, factor: int = 1, units: str = "voxels", svf: bool = False):
        super().__init__()
        if units not in ("voxels", "domain"):
            raise ValueError(f"Step: units must be 'voxels' or 'domain', got {units!r}")
        self.network, self.factor, self.units, self.svf = network, factor, units, svf
        self.channels_last = False  # run the network in channels-last layout (see use_channels_last)
        self.checkpointing = False  # training: keep no activations, recompute them in the backward pass

    def forward(self, moving, fixed) -> DisplacementField:
        pair = downsample(torch.cat([moving, fixed], 1), self.factor)
        if self.channels_last:
            pair = pair.contiguous(memory_format=_CHANNELS_LAST[pair.ndim])
        if self.checkpointing and self.training and torch.is_grad_enabled():
            field = checkpoint(self.network, pair, use_reentrant=False,
                               context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(self.network)))
        else:
            field = self.network(pair)
        if self.units == "voxels":
            field = field / voxel_scale(pair.shape[2:], field.device, field.dtype)
        if self.svf:
            return exp_velocity(field.contiguous())
        return DisplacementField(field.contiguous())


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """While a checkpointed forward is recomputed, batch norm normalises with the batch's statistics
    as in the first pass but leaves its running statistics alone: they are updated once per step."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def cascade(models, moving: torch.Tensor, fixed: torch.Tensor) -> Transform:
    """``Φ_0 ∘ Φ_1 ∘ ...``: model ``k`` registers the moving image warped by the maps of models
    ``0..k-1`` to the fixed image (the last map is applied to points first)."""
    phi = None
    for model in models:
        psi = model(moving if phi is None else warp(moving, phi), fixed)
        phi = psi if phi is None else phi @ psi
    return phi


class RegistrationModel(nn.Module):
    """A composition of steps: step ``k`` sees the moving image warped by steps ``0..k-1``, and the
    result is ``Φ = Φ_0 ∘ Φ_1 ∘ ... ∘ Φ_{K-1}`` (the last step is applied to points first)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.frozen: set[int] = set()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> Transform:
        return cascade(self.steps, moving, fixed)

    def checkpointing(self, on: bool = True) -> None:
        """Gradient checkpointing of every step's network (for volumes too large for memory)."""
        for step in self.steps:
            step.checkpointing = on

    def freeze(self, trainable) -> None:
        """Train only the steps whose indices are in ``trainable``; the others are frozen (no
        gradients, batch norm in evaluation mode)."""
        trainable = set(trainable)
        self.frozen = set(range(len(self.steps))) - trainable
        for i, step in enumerate(self.steps):
            step.requires_grad_(i in trainable)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for i in self.frozen:
            self.steps[i].train(False)
        return self


class CycleMorph(nn.Module):
    """CycleMorph's pair of registration models: ``g_ab`` and ``g_ba``, or one shared model.
    Called as ``model(moving, fixed)`` it registers with ``g_ab``."""

    def __init__(self, g_ab: RegistrationModel, g_ba: RegistrationModel | None = None):
        super().__init__()
        self.g_ab = g_ab
        if g_ba is not None:
            self.g_ba = g_ba

    @property
    def reverse(self) -> RegistrationModel:
        """The B→A model (``g_ab`` itself when shared)."""
        return getattr(self, "g_ba", self.g_ab)

    def forward(self, moving, fixed) -> Transform:
        return self.g_ab(moving, fixed)

    def freeze(self, trainable) -> None:
        self.g_ab.freeze(trainable)
        self.reverse.freeze(trainable)

    def checkpointing(self, on: bool = True) -> None:
        self.g_ab.checkpointing(on)
        self.reverse.checkpointing(on)


class Passes(nn.Module):
    """A trained model run ``passes`` times on a pair (``register --passes``), called like a model:
    each pass registers the moving image warped by the passes before, and the maps compose
    (:func:`cascade`). A pass corrects part of what the one before left, so an under-trained model
    gains accuracy at the cost of one network call per pass. ``model`` is the one pass."""

    def __init__(self, model: nn.Module, passes: int):
        super().__init__()
        if passes < 1:
            raise ValueError(f"Passes: expected at least 1 pass, got {passes}")
        self.model, self.passes = model, passes

    def forward(self, moving, fixed) -> Transform:
        return cascade([self.model] * self.passes, moving, fixed)


def forward_model(model) -> RegistrationModel:
    """The :class:`RegistrationModel` that ``model(moving, fixed)`` runs: ``g_ab`` of a CycleMorph model."""
    return model.g_ab if isinstance(model, CycleMorph) else model


def _per_network(model, fn):
    """``fn`` applied to the :class:`RegistrationModel` of ``model``; for a CycleMorph model, to each
    of its networks (once when shared), giving a CycleMorph model of the results."""
    if not isinstance(model, CycleMorph):
        return fn(model)
    if not hasattr(model, "g_ba"):
        return CycleMorph(fn(model.g_ab))
    return CycleMorph(fn(model.g_ab), fn(model.g_ba))


def split_steps(model, first: int):
    """``(global, local)``: models of steps ``0..first-1`` and of steps ``first..`` of ``model``,
    sharing its modules (a CycleMorph model splits each of its networks)."""
    return (_per_network(model, lambda m: RegistrationModel(m.steps[:first])),
            _per_network(model, lambda m: RegistrationModel(m.steps[first:])))


def coarse_view(model, factor: int):
    """The leading steps of ``model`` that downsample by a multiple of ``factor``, as a model of the
    images downsampled ``factor`` times: the same networks (tuning the view tunes ``model``), each
    downsampling ``factor`` times less, so that every network sees the grid it sees in ``model``.
    A CycleMorph model gives a CycleMorph view. Raises ``ValueError`` if the first step is finer."""
    return _per_network(model, lambda m: _coarse_steps(m, factor))


def _coarse_steps(model: RegistrationModel, factor: int) -> RegistrationModel:
    views = []
    for step in model.steps:
        if step.factor % factor:
            break
        view = Step(step.network, step.factor // factor, step.units, step.svf)
        view.channels_last = step.channels_last
        views.append(view)
    if not views:
        raise ValueError(f"coarse_view: the model's first step is downsampled {model.steps[0].factor}, "
                         f"not a multiple of {factor}")
    return RegistrationModel(views)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def use_channels_last(model: nn.Module, dim: int) -> nn.Module:
    """Run the networks in channels-last layout. oneDNN's CPU convolutions run it faster: about 1.6
    times for inference of the brain recipe's 3D U-Nets at 112×96×80, 1.3 to 1.4 times for a 2D
    training step at batch 128 (measured here). Results are equal up to the order of sums."""
    for module in model.modules():
        if isinstance(module, Step):
            module.channels_last = True
    return model.to(memory_format=_CHANNELS_LAST[dim + 2])


def compile_networks(model: nn.Module, shape, device=None) -> float:
    """``torch.compile`` every step's network in place (the weights keep their names) and compile it
    for images of ``shape`` with one warm-up registration; returns the seconds that took."""
    import time

    for module in model.modules():
        if isinstance(module, Step):
            module.network.compile()
    images = torch.zeros(1, 1, *shape, device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(images, images)
    return time.perf_counter() - start


def build_model(steps_config, dim: int, shape, method: str = "icon", shared: bool = False, units: str = "voxels",
                svf: bool = False):
    """Build a model from step descriptions ``[{"network": "unet", "downsample": 1, "params": {}}]``;
    for ``method="cyclemorph"`` two such models (one if ``shared``). ``units``, ``svf``: see :class:`Step`."""

    def one():
        steps = []
        for spec in steps_config:
            factor = int(spec.get("downsample", 1))
            step_shape = tuple((n - 1) // factor + 1 for n in shape) if shape is not None else None
            steps.append(Step(build_network(spec["network"], dim, step_shape, **dict(spec.get("params", {}))), factor, units, svf))
        return RegistrationModel(steps)

    if method == "cyclemorph":
        return CycleMorph(one(), None if shared else one())
    return one()
