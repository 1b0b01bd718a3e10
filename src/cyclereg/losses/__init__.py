"""Loss functions: similarities (:mod:`.similarity`) and regularisers (:mod:`.regularisers`), each a
stateless function returning one value per batch item ``(N,)``, with a thin :class:`torch.nn.Module`
around it that averages over the batch. A new similarity goes in :mod:`.similarity` and its name in
``SIMILARITIES`` (and ``cyclereg.core.config.SIMILARITY_NAMES``).
"""

from cyclereg.losses.regularisers import (Diffusion, GradientInverseConsistency, InverseConsistency, diffusion,
                                          gradient_inverse_consistency, inverse_consistency, random_points)
from cyclereg.losses.similarity import LNCC, MSE, NCC, SIMILARITIES, lncc, lncc_box, lncc_box_to, mse, ncc

__all__ = ["mse", "ncc", "lncc", "lncc_box", "lncc_box_to", "SIMILARITIES", "MSE", "NCC", "LNCC", "random_points",
           "inverse_consistency", "gradient_inverse_consistency", "diffusion", "InverseConsistency",
           "GradientInverseConsistency", "Diffusion"]
