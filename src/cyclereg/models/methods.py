"""Registration models (one network or a composition of steps) and the training losses of the
methods ICON, GradICON and the diffusion-regularised baseline.

A model is called as ``model(moving, fixed)`` and returns the transform ``Φ_AB`` with
``moving ∘ Φ_AB ≈ fixed`` (conventions: :mod:`cyclereg.coords`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cyclereg.losses.functions import SIMILARITIES, diffusion, gaussian_blur, gradient_inverse_consistency, inverse_consistency, lncc_box, random_points
from cyclereg.core.coords import identity_grid, voxel_scale
from cyclereg.models.networks import build_network
from cyclereg.core.transforms import DisplacementField, Transform, exp_velocity, map_on_grid, warp

__all__ = ["Step", "cascade", "RegistrationModel", "Passes", "CycleMorph", "coarse_view", "LossSettings", "METHODS",
           "loss_terms", "build_model", "settings_from_config", "use_channels_last", "compile_networks"]


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Smooth and resample ``(N, C, *spatial)`` to ``(n - 1) // factor + 1`` voxels per axis, keeping
    the corner voxels where they are, so the ``[0, 1]`` domain is unchanged."""
    if factor == 1:
        return images
    size = [(n - 1) // factor + 1 for n in images.shape[2:]]
    smooth = gaussian_blur(images, 0.5 * factor)
    return F.interpolate(smooth, size=size, mode="bilinear" if images.ndim == 4 else "trilinear", align_corners=True)


class Step(nn.Module):
    """One network predicting a displacement field, optionally on images downsampled by ``factor``
    (the field is then evaluated at full resolution by interpolation).

    The network's output is read in voxels of the grid it sees (``units="voxels"``) and turned into
    domain units here. A convolutional network sees shifts in voxels, so it then predicts the same
    field whatever the grid's extent: on a scan with a larger field of view, or on a patch
    (:mod:`cyclereg.multiscale`). It also keeps Adam's steps on the output layer small in domain
    units. ``units="domain"`` reads the output as domain units, as model files before format 3 did.

    With ``svf=True`` the output is a stationary velocity field and the step's map is its exponential
    (scaling and squaring, :func:`~cyclereg.transforms.exp_velocity`, on the grid the network sees):
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


@dataclass(frozen=True)
class LossSettings:
    method: str = "icon"
    similarity: str = "mse"
    lam: float = 1.0  # weight of the method's regulariser (λ; λ_R for CycleMorph)
    noise: float = 0.0  # icon: map noise in voxels
    sigma: float = 2.0  # lncc: Gaussian window in voxels
    window: int = 9  # lncc_box: box window in voxels
    alpha: float = 0.1  # cyclemorph: cycle loss weight
    beta: float = 0.5  # cyclemorph: identity loss weight

    def similarity_fn(self):
        fn = SIMILARITIES[self.similarity]
        if self.similarity == "lncc":
            return lambda a, b: fn(a, b, sigma=self.sigma)
        if self.similarity == "lncc_box":
            return lambda a, b: fn(a, b, window=self.window)
        return fn


def _displacement_on_grid(phi: Transform, like: torch.Tensor) -> torch.Tensor:
    shape = like.shape[2:]
    return map_on_grid(phi, shape, like) - identity_grid(shape, like.device, like.dtype)


def _icon(phi, n, fixed, settings):
    """ICON: ``‖Φ_AB∘Φ_BA − Id‖² + ‖Φ_BA∘Φ_AB − Id‖²`` at off-grid points, each a mean over points and
    components, as the authors' ``InverseConsistentNet``. ``phi`` holds ``Φ_AB`` in items ``0..n-1``
    and ``Φ_BA`` in items ``n..2n-1``, so both compositions run as one batch."""
    swapped = phi.take(torch.arange(2 * n, device=fixed.device).roll(n))
    points = random_points(2 * n, fixed.shape[2:], fixed.device, fixed.dtype)
    return inverse_consistency(phi, swapped, points, settings.noise).view(2, n).sum(0)


def _gradicon(phi, n, fixed, settings):
    """GradICON: the squared Jacobian of ``Φ_AB∘Φ_BA − Id`` at off-grid points, as the authors'
    ``GradientICON`` (one composition; :func:`~cyclereg.losses.gradient_inverse_consistency`)."""
    index = torch.arange(2 * n, device=fixed.device)
    points = random_points(n, fixed.shape[2:], fixed.device, fixed.dtype)
    return gradient_inverse_consistency(phi.take(index[:n]), phi.take(index[n:]), points)


def _diffusion(phi, n, fixed, settings):
    """The diffusion baseline (VoxelMorph's ``Grad('l2')``) of ``Φ_AB``'s displacement on the grid."""
    return diffusion(_displacement_on_grid(phi, fixed))


def _pairwise(name: str, regulariser, symmetric: bool):
    """The loss ``sim + λ · regulariser`` of ICON, GradICON or the diffusion baseline, with
    ``regulariser(phi, n, fixed, settings)`` one value per pair.

    Symmetric methods run A→B and B→A as one batch of ``2n`` through the network (``phi`` holds
    ``Φ_AB`` then ``Φ_BA``), and their similarity is the sum over both directions, as the ICON
    authors'. Terms are means over the ``n`` pairs.
    """

    def loss(model, moving, fixed, settings):
        n = moving.shape[0]
        a, b = (torch.cat([moving, fixed]), torch.cat([fixed, moving])) if symmetric else (moving, fixed)
        phi = model(a, b)
        sim = settings.similarity_fn()(warp(a, phi), b)
        sim = sim.view(2, n).sum(0) if symmetric else sim
        terms = {"sim": sim.mean(), name: regulariser(phi, n, fixed, settings).mean()}
        return terms["sim"] + settings.lam * terms[name], terms

    return loss


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


def _cyclemorph(model, moving, fixed, settings):
    """CycleMorph (Kim et al.): per direction, similarity + λ_R ‖∇D‖²; the cycle loss
    ``α ‖(A∘Φ_AB)∘G_BA(A∘Φ_AB, B∘Φ_BA) − A‖₁``; the identity loss ``β (1 − LNCC(B∘G_AB(B, B), B))``
    with the authors' local NCC over a box of ``window`` voxels (:func:`~cyclereg.losses.lncc_box`).
    Every term sums both directions, as the authors' ``backward_G``."""
    g_ab, g_ba = model.g_ab, model.reverse
    sim_fn = settings.similarity_fn()
    phi_ab, phi_ba = g_ab(moving, fixed), g_ba(fixed, moving)
    warped_a, warped_b = warp(moving, phi_ab), warp(fixed, phi_ba)
    sim = sim_fn(warped_a, fixed) + sim_fn(warped_b, moving)
    smooth = diffusion(_displacement_on_grid(phi_ab, moving)) + diffusion(_displacement_on_grid(phi_ba, moving))
    back_a = warp(warped_a, g_ba(warped_a, warped_b))
    back_b = warp(warped_b, g_ab(warped_b, warped_a))
    cycle = (back_a - moving).abs().flatten(1).mean(1) + (back_b - fixed).abs().flatten(1).mean(1)
    local_ncc = lambda w, f: lncc_box(w, f, settings.window)  # noqa: E731
    identity = local_ncc(warp(fixed, g_ab(fixed, fixed)), fixed) + local_ncc(warp(moving, g_ba(moving, moving)), moving)
    terms = {"sim": sim.mean(), "smooth": smooth.mean(), "cycle": cycle.mean(), "identity": identity.mean()}
    total = terms["sim"] + settings.lam * terms["smooth"] + settings.alpha * terms["cycle"] + settings.beta * terms["identity"]
    return total, terms


# name -> loss(model, moving, fixed, settings) -> (total, {term: value})
METHODS = {
    "icon": _pairwise("icon", _icon, symmetric=True),
    "gradicon": _pairwise("gradicon", _gradicon, symmetric=True),
    "diffusion": _pairwise("diffusion", _diffusion, symmetric=False),
    "cyclemorph": _cyclemorph,
}


def settings_from_config(model_cfg, lam: float | None = None) -> LossSettings:
    """The loss settings of a :class:`~cyclereg.config.ModelConfig` (``lam`` overrides λ)."""
    m = model_cfg
    return LossSettings(m.method, m.similarity, m.lam if lam is None else lam, m.noise, m.sigma, m.window, m.alpha, m.beta)


def loss_terms(model, moving: torch.Tensor, fixed: torch.Tensor, settings: LossSettings):
    """The training loss of ``settings.method`` on a batch of pairs ``(N, C, *spatial)``.
    Returns ``(total, {term: value})``; terms are means over the ``N`` pairs."""
    return METHODS[settings.method](model, moving, fixed, settings)


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
