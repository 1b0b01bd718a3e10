"""What the 2D datasets (:mod:`.datasets`) and folders of scans (:mod:`.volumes`) share: drawing pairs of
distinct images, the seed offsets of held-out and test data, and the preprocessing of a data config."""

from __future__ import annotations

import torch

from cyclereg.core.errors import DataError

__all__ = ["HELDOUT_SEED", "TEST_SEED", "random_pairs", "fixed_pairs", "intensity_range", "preprocessing"]

# Seed offsets that keep held-out (and test) data apart from the training draws.
HELDOUT_SEED, TEST_SEED = 7_919, 104_729


def random_pairs(n_images: int, n_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """``(n_pairs, 2)`` indices of distinct (moving, fixed) images drawn with ``generator``."""
    if n_images < 2:
        raise DataError(f"need at least two images to form pairs, got {n_images}")
    first = torch.randint(n_images, (n_pairs,), generator=generator)
    second = (first + torch.randint(1, n_images, (n_pairs,), generator=generator)) % n_images
    return torch.stack([first, second], 1)


def fixed_pairs(images: torch.Tensor, n_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_pairs`` seeded (moving, fixed) pairs of distinct images."""
    idx = random_pairs(len(images), n_pairs, torch.Generator().manual_seed(seed))
    return images[idx[:, 0]], images[idx[:, 1]]


def intensity_range(cfg) -> tuple[float, float]:
    """The intensity range of a dataset's images (inputs to a model are normalised to it)."""
    return (-1.0, 1.0) if cfg.dataset == "triangles" else (0.0, 1.0)


def preprocessing(cfg):
    """The :class:`~cyclereg.io.preprocess.Preprocessing` of a :class:`~cyclereg.core.config.DataConfig`."""
    from cyclereg.io.preprocess import Preprocessing

    if cfg.dataset != "folder":
        return Preprocessing(range=intensity_range(cfg))
    return Preprocessing(cfg.intensity, tuple(cfg.percentiles), tuple(cfg.window), (0.0, 1.0),
                         tuple(cfg.spacing), cfg.pad_multiple)
