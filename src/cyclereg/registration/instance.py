"""Instance optimisation: the network fine-tuned on the one pair at hand for a few steps, then restored
(``register --io-steps``), and the maps refined (``--io-field-steps``, :mod:`.refine`)."""

from __future__ import annotations

import contextlib
import copy

import torch

from cyclereg.core.errors import UsageError
from cyclereg.core.transforms import Transform
from cyclereg.models.methods import LossSettings, loss_terms, settings_from_config
from cyclereg.models.registration import Passes, coarse_view, downsample
from cyclereg.registration.refine import refine_as
from cyclereg.registration.tuning import NO_IO, InstanceOptimisation

__all__ = ["instance_optimisation", "tuned_maps", "register_tensors"]


@contextlib.contextmanager
def instance_optimisation(model, moving, fixed, settings: LossSettings, tuning: InstanceOptimisation):
    """Fine-tune ``model`` on one pair as ``tuning`` says (batch norm in evaluation mode), yield it, then
    restore the original weights whatever happens. A model run in :class:`~cyclereg.models.registration.Passes`
    is fine-tuned as trained: one pass."""
    trained = model.model if isinstance(model, Passes) else model
    if tuning.steps and tuning.downsample > 1:
        try:
            trained = coarse_view(trained, tuning.downsample)
        except ValueError:
            raise UsageError(f"--io-downsample {tuning.downsample}: the model's first step is not downsampled by a "
                             f"multiple of {tuning.downsample}, so no step can be tuned on the downsampled pair") from None
        moving, fixed = downsample(moving, tuning.downsample), downsample(fixed, tuning.downsample)
    saved = copy.deepcopy(model.state_dict())
    try:
        if tuning.steps > 0:
            model.eval()
            trained.eval()
            params = list(trained.parameters())
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=tuning.lr)
            with torch.enable_grad():
                for _ in range(tuning.steps):
                    loss, _ = loss_terms(trained, moving, fixed, settings)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        yield model
    finally:
        model.load_state_dict(saved)
        model.eval()


def tuned_maps(model, info, moving: torch.Tensor, fixed: torch.Tensor, tuning: InstanceOptimisation = NO_IO,
               both: bool = False):
    """``(Φ_AB, Φ_BA)`` for prepared inputs ``(N, 1, *spatial)`` on one model grid: the model fine-tuned on
    the pair as ``tuning`` says (with the λ of its last training stage), each map then refined; ``Φ_BA``
    (the reversed pair, with the same tuned weights) only if ``both``, else ``None``."""
    device = next(model.parameters()).device
    m, f = moving.to(device), fixed.to(device)
    settings = settings_from_config(info.config.model, info.config.final_lam())
    with instance_optimisation(model, m, f, settings, tuning) as tuned, torch.no_grad():
        ab, ba = tuned(m, f), tuned(f, m) if both else None
    return refine_as(tuning, ab, m, f), refine_as(tuning, ba, f, m) if both else None


def register_tensors(model, info, moving: torch.Tensor, fixed: torch.Tensor, tuning: InstanceOptimisation = NO_IO) -> Transform:
    """``Φ_AB`` for prepared inputs ``(1, 1, *spatial)`` on one model grid (:func:`tuned_maps`)."""
    return tuned_maps(model, info, moving, fixed, tuning)[0]
