"""``cyclereg evaluate --dataset``: a model scored on seeded pairs of a 2D dataset (triangles & circles,
MNIST), with the keys of ``docs/metrics.md``."""

from __future__ import annotations

import dataclasses

from cyclereg.core.errors import UsageError
from cyclereg.data.datasets import dataset_images, fixed_pairs
from cyclereg.evaluation.scores import score_pairs, summarise
from cyclereg.registration.instance import tuned_maps
from cyclereg.registration.tuning import NO_IO, InstanceOptimisation

__all__ = ["evaluate_dataset"]


def evaluate_dataset(model, info, dataset: str | None = None, root: str | None = None, digit: int | None = None,
                     size: int | None = None, split: str = "heldout", pairs: int = 100, seed: int = 0,
                     tuning: InstanceOptimisation = NO_IO) -> dict:
    """The summary of ``model`` (with its :class:`~cyclereg.models.modelfile.ModelInfo` ``info``) on
    ``pairs`` seeded pairs of ``dataset`` (default: the one it was trained on). MNIST: ``root`` and
    ``digit`` default to the model's, ``split`` is ``train``, ``heldout`` or ``test``; triangles:
    ``size`` defaults to the model's. With instance optimisation each pair is tuned, both directions."""
    if pairs < 1:
        raise UsageError(f"--pairs: expected at least 1, got {pairs}")
    data = info.config.data
    dataset = dataset or data.dataset
    if dataset == "mnist":
        data = dataclasses.replace(data, dataset="mnist", root=root or data.root, digit=data.digit if digit is None else digit)
        if not data.root:
            raise UsageError("--root: the folder of the MNIST IDX files is required")
        if data.digit not in range(10):
            raise UsageError(f"--digit: expected an integer from 0 to 9, got {data.digit}")
    else:
        data = dataclasses.replace(data, dataset="triangles", size=size or info.shape[-1])
    images = dataset_images(data, split if dataset == "mnist" else "test", n_test=2 * pairs)
    if tuple(images.shape[2:]) != tuple(info.shape):
        raise UsageError(f"the model registers images of shape {tuple(info.shape)}, the dataset has {tuple(images.shape[2:])}")
    moving, fixed = fixed_pairs(images, pairs, seed)
    tuned = tuning.steps or tuning.field_steps
    register = (lambda m, f: tuned_maps(model, info, m, f, tuning, both=True)) if tuned else None
    return summarise(score_pairs(model, moving, fixed, batch_size=1 if tuned else 64, register=register), info.shape)
