"""Data: the triangles & circles generator of the ICON paper, an MNIST reader for the standard IDX
files, and seeded random pairs.

Images are float32 tensors ``(N, 1, H, W)`` (see :mod:`cyclereg.core.coords`).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from cyclereg.core.errors import DataError
from cyclereg.data.common import HELDOUT_SEED, TEST_SEED, fixed_pairs, preprocessing, random_pairs

__all__ = ["triangles_and_circles", "read_idx", "load_mnist", "random_pairs", "random_affine", "MNIST_FILES"]


def triangles_and_circles(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """``n`` images ``(n, 1, size, size)`` of the ICON paper's triangles & circles, in ``[-1, 1]``.

    On ``[0, 1]²``: centre uniform in ``[0.4, 0.7]²``, radius uniform in ``[0.2, 0.4]``; the first half
    are triangles (equilateral, circumradius = radius, random rotation), the second half circles; the
    value is ``tanh(-40 d)`` with ``d`` the signed distance to the outline (negative inside). Seeded.
    """
    g = torch.Generator().manual_seed(seed)
    centre = 0.4 + 0.3 * torch.rand(n, 2, 1, 1, generator=g, dtype=torch.float64)
    radius = 0.2 + 0.2 * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    angle = 2 * math.pi * torch.rand(n, 1, 1, generator=g, dtype=torch.float64)
    axis = torch.linspace(0, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    dy, dx = yy - centre[:, 0], xx - centre[:, 1]
    circle = torch.sqrt(dx**2 + dy**2) - radius
    # Equilateral triangle: inside where all three edge half-planes agree; the edge lines lie at
    # distance radius/2 from the centre, with outward normals at angle + 0, 120, 240 degrees.
    edges = [dx * torch.cos(angle + k * 2 * math.pi / 3) + dy * torch.sin(angle + k * 2 * math.pi / 3) for k in range(3)]
    triangle = torch.stack(edges).amax(0) - radius / 2
    is_triangle = (torch.arange(n) < (n + 1) // 2).view(n, 1, 1)
    distance = torch.where(is_triangle, triangle, circle)
    return torch.tanh(-40 * distance).float().unsqueeze(1)


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not; returns an array of its declared shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX file is truncated inside its header")
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX file holds {len(raw)} bytes, its header declares {expected}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"MNIST: {root} has no file {stem} or {stem}.gz (the standard IDX files)")


def load_mnist(root, split: str = "train", digit: int | None = 5) -> torch.Tensor:
    """Images of one ``digit`` (or all, with ``None``) from the IDX files in ``root``, as
    ``(N, 1, 28, 28)`` float32 in ``[0, 1]``. ``split`` is ``"train"`` or ``"test"``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST root {root} is not a folder")
    if split not in MNIST_FILES:
        raise DataError(f"MNIST split {split!r}: expected one of {sorted(MNIST_FILES)}")
    if digit is not None and digit not in range(10):
        raise DataError(f"MNIST digit {digit!r}: expected an integer from 0 to 9")
    images_file, labels_file = (_find(root, stem) for stem in MNIST_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST: {images_file} and {labels_file} do not hold matching images and labels")
    if digit is not None:
        images = images[labels == digit]
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def random_affine(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Each image warped by its own random affine map about the centre, for augmentation.

    The map is ``p -> (I + strength·E)(p - c) + c + t`` with ``E`` standard normal ``d × d``
    (rotation, scaling and shear together) and ``t`` normal of standard deviation ``strength / 2``
    in the ``[0, 1]`` domain (:mod:`cyclereg.core.coords`); parameters are drawn from ``generator``.
    """
    from cyclereg.data.augment import random_affine_map
    from cyclereg.core.transforms import warp

    affine = random_affine_map(images.shape[0], images.ndim - 2, strength, generator, images.device, images.dtype)
    return warp(images, affine)


def dataset_images(cfg, split: str = "train", n_test: int = 0) -> torch.Tensor:
    """Images of a :class:`~cyclereg.core.config.DataConfig` for ``split``:

    * ``train``: what training sees (MNIST: the digit's training images minus the held-out tail);
    * ``heldout``: images never trained on (MNIST: the last ``holdout`` fraction of the training
      file's digit images; triangles: another seed), used for validation;
    * ``test``: MNIST's t10k files; triangles: ``n_test`` images from a third seed.
    """
    if cfg.dataset == "triangles":
        if split == "train":
            return triangles_and_circles(cfg.n_train, cfg.size, cfg.seed)
        if split == "heldout":
            return triangles_and_circles(max(64, 2 * cfg.val_pairs), cfg.size, cfg.seed + HELDOUT_SEED)
        if split == "test":
            return triangles_and_circles(max(2, n_test), cfg.size, cfg.seed + TEST_SEED)
    elif cfg.dataset == "mnist":
        if split == "test":
            return load_mnist(cfg.root, "test", cfg.digit)
        if split in ("train", "heldout"):
            images = load_mnist(cfg.root, "train", cfg.digit)
            n_out = max(2, int(math.ceil(cfg.holdout * len(images))))
            if len(images) - n_out < 2:
                raise DataError(f"MNIST digit {cfg.digit}: only {len(images)} images in {cfg.root}, too few to hold out {n_out}")
            return images[:-n_out] if split == "train" else images[-n_out:]
    raise DataError(f"unknown dataset {cfg.dataset!r} or split {split!r}")


class ImageSet:
    """The 2D datasets (triangles, MNIST) as training data: random pairs, optional random affines."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.images = dataset_images(cfg, "train")
        self.shape = tuple(self.images.shape[2:])
        self.preprocess = preprocessing(cfg)

    def pair(self, generator: torch.Generator):
        """One random pair ``(moving, fixed)``, each ``(1, 1, *shape)``, drawn with ``generator``."""
        idx = random_pairs(len(self.images), 1, generator)
        moving, fixed = self.images[idx[:, 0]], self.images[idx[:, 1]]
        if self.cfg.augment:
            moving = random_affine(moving, self.cfg.augment, generator)
            fixed = random_affine(fixed, self.cfg.augment, generator)
        return moving, fixed

    def heldout(self):
        return fixed_pairs(dataset_images(self.cfg, "heldout"), self.cfg.val_pairs, self.cfg.seed)

    def summary(self) -> dict:
        """What the model was trained on, for the model file's header."""
        out = {"dataset": self.cfg.dataset, "images": len(self.images), "shape": list(self.shape)}
        if self.cfg.dataset == "mnist":
            out.update(root=self.cfg.root, digit=self.cfg.digit)
        return out


def training_data(cfg):
    """Training data of a :class:`~cyclereg.core.config.DataConfig`: ``.shape``, ``.preprocess``,
    ``.pair(generator) -> (moving, fixed)`` (one pair; batches: :mod:`cyclereg.training.loader`),
    ``.heldout() -> (moving, fixed)`` and ``.summary()``."""
    if cfg.dataset == "folder":
        from cyclereg.data.volumes import ScanSet

        return ScanSet(cfg)
    return ImageSet(cfg)
