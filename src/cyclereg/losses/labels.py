"""Label supervision, as VoxelMorph's semi-supervised mode: one-hot label maps, warped with linear
interpolation by the map that warps the image, scored by soft Dice against the fixed image's labels.

A label map is carried as ``(N, K, *spatial)`` one-hot channels, one per label of ``data.label_list``
(background and unlisted values: all channels 0). A scan without labels has all channels 0 everywhere,
and pairs where either side has none are left out of the term.
"""

from __future__ import annotations

import torch

__all__ = ["label_indices", "one_hot", "dice_loss", "has_labels"]


def label_indices(values: torch.Tensor, label_list) -> torch.Tensor:
    """``values`` (any integer map) as indices into ``label_list``: ``k + 1`` where the value is
    ``label_list[k]``, 0 elsewhere; ``uint8`` (at most 255 labels)."""
    if len(label_list) > 255:
        raise ValueError(f"label_indices: at most 255 labels, got {len(label_list)}")
    out = torch.zeros(values.shape, dtype=torch.uint8)
    for k, value in enumerate(label_list):
        out[values == value] = k + 1
    return out


def one_hot(indices: torch.Tensor, n_labels: int, dtype=torch.float32) -> torch.Tensor:
    """``(N, 1, *spatial)`` label indices (0: none) as ``(N, n_labels, *spatial)`` one-hot channels."""
    values = indices[:, 0].long()
    channels = [(values == k + 1) for k in range(n_labels)]
    return torch.stack(channels, 1).to(dtype)


def has_labels(labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` True for the items whose label map holds any label."""
    return labels.flatten(1).sum(1) > 0


def dice_loss(warped: torch.Tensor, fixed: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 − Dice`` per item ``(N,)``: soft Dice ``2 Σ w·f / (Σ w + Σ f)`` of each label channel, averaged
    over the channels present in either map (VoxelMorph's ``Dice`` averages over all channels; a label
    absent from both would count as a Dice of 0 there, a penalty no map can undo)."""
    dims = tuple(range(2, warped.ndim))
    overlap = (warped * fixed).sum(dims)
    total = warped.sum(dims) + fixed.sum(dims)
    present = total > eps
    dice = 2 * overlap / total.clamp_min(eps)
    mean = (dice * present).sum(1) / present.sum(1).clamp_min(1)
    return 1 - mean
