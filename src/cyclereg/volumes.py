"""Training on scans: a folder (or a CSV) of images, all prepared on one model grid, with seeded
augmentation that makes a training population even from a single scan.

The model grid is that of the atlas (``data.atlas``) or of the first scan (:mod:`cyclereg.preprocess`);
every scan is resampled onto it in physical space, so scans must be affinely aligned to each other.
Pairs are inter-subject (two different scans; with a single scan, the scan with itself) or
all-to-atlas. With four scans or more the last ``data.holdout`` fraction is kept out for validation;
with fewer, validation uses the same scans with augmentations drawn from another seed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from .augment import AugmentSettings, augment_pair
from .errors import DataError
from .image_io import read_image
from .preprocess import model_grid, prepare

__all__ = ["scan_paths", "ScanSet"]

_HELDOUT_SEED = 7_919


def scan_paths(cfg) -> list[Path]:
    """The scans named by ``data.root``: a folder (files matching ``data.pattern``) or a CSV file with
    a column ``image`` (paths relative to the CSV's folder)."""
    root = Path(cfg.root)
    if root.is_dir():
        paths = sorted(p for p in root.glob(cfg.pattern) if p.is_file())
        if not paths:
            raise DataError(f"data.root {root} holds no file matching data.pattern {cfg.pattern!r}")
        return paths
    if root.is_file() and root.suffix.lower() == ".csv":
        with root.open(newline="") as f:
            reader = csv.DictReader(f)
            if "image" not in (reader.fieldnames or []):
                raise DataError(f"data.root {root}: the CSV has no column 'image'")
            paths = [root.parent / row["image"] for row in reader if row.get("image")]
        if not paths:
            raise DataError(f"data.root {root} lists no images")
        return paths
    raise DataError(f"data.root {root} is neither a folder nor a CSV file")


class ScanSet:
    """Scans on one model grid; pairs drawn with a seeded generator and augmented."""

    def __init__(self, cfg):
        from .data import preprocessing

        self.cfg = cfg
        self.preprocess = preprocessing(cfg)
        paths = scan_paths(cfg)
        n_out = max(1, math.ceil(cfg.holdout * len(paths))) if len(paths) >= 4 else 0
        self.train_paths, self.heldout_paths = (paths[:-n_out], paths[-n_out:]) if n_out else (paths, paths)
        reference = read_image(cfg.atlas, "data.atlas") if cfg.atlas else read_image(self.train_paths[0], "data.root")
        self.grid = model_grid(reference, self.preprocess)
        self.shape = tuple(reversed(self.grid.size))
        self.atlas = prepare(reference, self.grid, self.preprocess, f"data.atlas {cfg.atlas}") if cfg.atlas else None
        self.images = self._load(self.train_paths, reference.GetDimension())
        self.settings = AugmentSettings(deform=cfg.deform, smoothness=cfg.smoothness, affine=cfg.augment,
                                        flips=cfg.flips, permute=cfg.permute, intensity=cfg.intensity_augment)

    def _load(self, paths, dim) -> torch.Tensor:
        out = []
        for p in paths:
            image = read_image(p, "scan")
            if image.GetDimension() != dim:
                raise DataError(f"scan {p} is {image.GetDimension()}D; the other scans are {dim}D")
            out.append(prepare(image, self.grid, self.preprocess, f"scan {p}"))
        return torch.cat(out)

    def _pairs(self, images, batch_size, generator):
        if self.atlas is not None:
            idx = torch.randint(len(images), (batch_size,), generator=generator)
            return images[idx], self.atlas.expand(batch_size, *self.atlas.shape[1:])
        if len(images) == 1:
            return images.expand(batch_size, *images.shape[1:]), images.expand(batch_size, *images.shape[1:])
        first = torch.randint(len(images), (batch_size,), generator=generator)
        second = (first + torch.randint(1, len(images), (batch_size,), generator=generator)) % len(images)
        return images[first], images[second]

    def batch(self, batch_size: int, generator: torch.Generator):
        moving, fixed = self._pairs(self.images, batch_size, generator)
        moving, fixed, _ = augment_pair(moving, fixed, self.settings, generator)
        return moving, fixed

    def summary(self) -> dict:
        """What the model was trained on, for the model file's header."""
        return {"dataset": "folder", "root": self.cfg.root, "pattern": self.cfg.pattern, "atlas": self.cfg.atlas,
                "scans": len(self.train_paths), "heldout_scans": 0 if self.heldout_paths is self.train_paths else len(self.heldout_paths),
                "first_scans": [str(p) for p in self.train_paths[:3]], "shape": list(self.shape)}

    def heldout(self):
        """``data.val_pairs`` augmented pairs of the held-out scans, from a seed of their own."""
        images = self.images if self.heldout_paths is self.train_paths else self._load(self.heldout_paths, self.images.ndim - 2)
        generator = torch.Generator().manual_seed(self.cfg.seed + _HELDOUT_SEED)
        moving, fixed = self._pairs(images, self.cfg.val_pairs, generator)
        with torch.no_grad():
            moving, fixed, _ = augment_pair(moving, fixed, self.settings, generator)
        return moving, fixed
