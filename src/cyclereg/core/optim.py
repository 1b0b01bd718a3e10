"""Adam with its step sizes decayed along a cosine, for the small per-pair optimisations (the affine stage,
map refinement).

Written out rather than taken from ``torch.optim``: ``torch.optim`` imports ``torch._dynamo`` on first
use, 2.3 to 2.8 s of this project's CPU, which would be a tenth of registering a pair from the shell. The
update is torch's Adam (bias-corrected moments, ``eps`` added to the corrected root) and the decay torch's
``CosineAnnealingLR`` over ``steps``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["cosine_adam"]


def cosine_adam(groups: list[tuple[torch.Tensor, float]], loss: Callable[[], torch.Tensor | None], steps: int,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """Minimise ``loss()`` over the tensors of ``groups`` (each with its first step size), in place, for
    ``steps`` steps, the step sizes decayed to zero along a cosine; stops early if ``loss()`` returns None."""
    tensors = [p for p, _ in groups]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in tensors]
    b1, b2 = betas
    for step in range(1, steps + 1):
        with torch.enable_grad():
            value = loss()
            if value is None:
                return
            grads = torch.autograd.grad(value, tensors)
        decay = 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        with torch.no_grad():
            for (p, lr), (m, v), g in zip(groups, moments, grads):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(lr * decay * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps))
