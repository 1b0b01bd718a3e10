"""Direct optimisation: the losses of a method minimised over the two displacement fields of one
pair, without a network (ICON paper, Fig. 5; also a classical pairwise baseline).

The fields are stored in voxels of the pair's grid, so Adam's step size ``lr`` is in voxels whatever
the image size, and it decays to zero along a cosine. With a constant step, Adam ends with fields
that jitter by about ``lr`` per voxel; with the ICON noise (whose gradient is random) that jitter
folded 80 cells per 64² triangles pair, against 0.3 with the cosine (1000 steps, 0.3 voxels).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from cyclereg.core.coords import voxel_scale
from cyclereg.models.methods import METHODS, LossSettings, loss_terms
from cyclereg.core.transforms import DisplacementField

__all__ = ["PairFields", "optimize_pair"]


class PairFields(nn.Module):
    """The fields ``D_AB`` and ``D_BA`` of one pair as parameters (in voxels), called like a model.

    ``loss_terms`` calls a model on ``cat([A, B])`` (symmetric methods) or on ``A`` alone, so the
    first ``N`` fields answer ``(A, B)`` and the next ``N`` answer ``(B, A)``.
    """

    def __init__(self, n: int, shape):
        super().__init__()
        self.fields = nn.Parameter(torch.zeros(2 * n, len(shape), *shape))
        self.register_buffer("scale", voxel_scale(shape), persistent=False)

    def in_domain(self) -> torch.Tensor:
        """Both fields in the domain units of :mod:`cyclereg.core.coords`."""
        return self.fields / self.scale

    def forward(self, moving, fixed):
        return DisplacementField(self.in_domain()[: moving.shape[0]])


def optimize_pair(moving: torch.Tensor, fixed: torch.Tensor, settings: LossSettings, steps: int = 500,
                  lr: float = 0.3, progress: bool = False, generator_seed: int = 0):
    """Minimise ``settings``' loss over ``D_AB, D_BA`` for images ``(N, 1, *spatial)``.

    ``lr`` is Adam's first step in voxels, decayed to zero along a cosine over ``steps``.
    Returns ``(Φ_AB, Φ_BA, history)`` with the loss per step in ``history``.
    """
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}")
    fields = PairFields(moving.shape[0], moving.shape[2:]).to(moving.device)
    optimizer = torch.optim.Adam(fields.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    history = []
    cuda = [moving.device] if moving.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the sample points are seeded; the caller's generator is left as it was
        torch.manual_seed(generator_seed)
        for _ in tqdm(range(steps), desc="optimize", disable=not progress, dynamic_ncols=True):
            loss, _ = loss_terms(fields, moving, fixed, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(float(loss.detach()))
    n = moving.shape[0]
    field = fields.in_domain().detach()
    return DisplacementField(field[:n]), DisplacementField(field[n:]), history
