"""The training losses of the methods: ICON, GradICON, the diffusion-regularised baseline and CycleMorph,
each ``loss(model, moving, fixed, settings, labels=None) -> (total, {term: value})`` on a batch of pairs,
with the authors' terms and weights (``tests/test_wiring.py`` pins each term to a closed form). A new
method goes here, with its name in ``METHODS`` (and ``cyclereg.core.config.METHOD_NAMES``).

With ``labels = (moving_labels, fixed_labels)`` (one-hot, :mod:`cyclereg.losses.labels`) and
``settings.label_weight > 0``, every method adds ``label_weight · labels``: 1 − Dice of the moving labels
warped by the map that warps the image, against the fixed labels, over the pairs where both have labels
(VoxelMorph's semi-supervised mode), in each direction the method's similarity covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cyclereg.core.coords import identity_grid
from cyclereg.core.transforms import Transform, map_on_grid, warp
from cyclereg.losses.labels import dice_loss, has_labels
from cyclereg.losses import SIMILARITIES, diffusion, gradient_inverse_consistency, inverse_consistency, lncc_box, random_points

__all__ = ["LossSettings", "METHODS", "loss_terms", "settings_from_config"]


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
    label_weight: float = 0.0  # weight of 1 − Dice of warped labels (0: images only)

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


def _label_term(pairs, labels) -> torch.Tensor:
    """``1 − Dice`` summed over the directions in ``pairs`` (``(warped_labels, target_labels)`` each), its
    mean over the pairs with labels on both sides (0 if none)."""
    per_pair = torch.stack([dice_loss(warped, target) for warped, target in pairs]).sum(0)
    mask = has_labels(labels[0]) & has_labels(labels[1])
    return (per_pair * mask).sum() / mask.sum().clamp_min(1)


def _with_labels(total, terms, settings, labels, pairs):
    """``total`` and ``terms`` with the label term added, when it is asked for and labels are given."""
    if labels is None or not settings.label_weight:
        return total, terms
    terms["labels"] = _label_term(pairs(), labels)
    return total + settings.label_weight * terms["labels"], terms


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

    def loss(model, moving, fixed, settings, labels=None):
        n = moving.shape[0]
        a, b = (torch.cat([moving, fixed]), torch.cat([fixed, moving])) if symmetric else (moving, fixed)
        phi = model(a, b)
        sim = settings.similarity_fn()(warp(a, phi), b)
        sim = sim.view(2, n).sum(0) if symmetric else sim
        terms = {"sim": sim.mean(), name: regulariser(phi, n, fixed, settings).mean()}

        def pairs():
            ml, fl = labels
            if not symmetric:
                return [(warp(ml, phi), fl)]
            warped = warp(torch.cat([ml, fl]), phi)
            return [(warped[:n], fl), (warped[n:], ml)]

        return _with_labels(terms["sim"] + settings.lam * terms[name], terms, settings, labels, pairs)

    return loss


def _cyclemorph(model, moving, fixed, settings, labels=None):
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
    return _with_labels(total, terms, settings, labels,
                        lambda: [(warp(labels[0], phi_ab), labels[1]), (warp(labels[1], phi_ba), labels[0])])


# name -> loss(model, moving, fixed, settings, labels=None) -> (total, {term: value})
METHODS = {
    "icon": _pairwise("icon", _icon, symmetric=True),
    "gradicon": _pairwise("gradicon", _gradicon, symmetric=True),
    "diffusion": _pairwise("diffusion", _diffusion, symmetric=False),
    "cyclemorph": _cyclemorph,
}


def settings_from_config(model_cfg, lam: float | None = None) -> LossSettings:
    """The loss settings of a :class:`~cyclereg.core.config.ModelConfig` (``lam`` overrides λ)."""
    m = model_cfg
    return LossSettings(m.method, m.similarity, m.lam if lam is None else lam, m.noise, m.sigma, m.window, m.alpha,
                        m.beta, m.label_weight)


def loss_terms(model, moving: torch.Tensor, fixed: torch.Tensor, settings: LossSettings, labels=None):
    """The training loss of ``settings.method`` on a batch of pairs ``(N, C, *spatial)``, with
    ``labels = (moving_labels, fixed_labels)`` one-hot ``(N, K, *spatial)`` if given.
    Returns ``(total, {term: value})``; terms are means over the ``N`` pairs."""
    return METHODS[settings.method](model, moving, fixed, settings, labels)
