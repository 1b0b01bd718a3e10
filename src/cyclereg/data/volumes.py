"""Training on scans: a folder (or a CSV) of images, all prepared on one model grid, with seeded
augmentation that makes a training population even from a single scan.

The model grid is that of the space (``data.space``, else the atlas ``data.atlas``, else the first scan;
:mod:`cyclereg.io.preprocess`); every scan is resampled onto it in physical space. Scans in their own
scanner spaces (real subjects) take ``data.align = "affine"``: each is first aligned to the space by the
affine stage (:func:`~cyclereg.registration.affine.affine_register`, NCC), once (kept in ``data.cache``), and
the model file records the space's axes so that registration runs on grids of the same orientation.
Pairs are inter-subject (two different scans; with a single scan, the scan with itself) or
all-to-atlas. With four scans or more the last ``data.holdout`` fraction is kept out for validation;
with fewer, validation uses the same scans with augmentations drawn from another seed.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from cyclereg.core.atomic import atomic_path
from cyclereg.data.augment import AugmentSettings, augment_pair
from cyclereg.core.errors import DataError
from cyclereg.data.common import HELDOUT_SEED, preprocessing, random_pairs
from cyclereg.io.images import read_image
from cyclereg.io.preprocess import model_grid, prepare
from cyclereg.registration.affine import affine_register

__all__ = ["scan_paths", "ScanSet"]

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
    """Scans on one model grid; pairs drawn with a seeded generator and augmented.

    With ``data.cache`` set, each prepared scan is kept there as a ``.npy`` file named by a hash of the
    scan file (path, size, modification time), the preprocessing and the model grid, and read back
    memory-mapped: later runs start at once, and the processes of a distributed run share the pages."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.preprocess = preprocessing(cfg)
        paths = scan_paths(cfg)
        n_out = max(1, math.ceil(cfg.holdout * len(paths))) if len(paths) >= 4 else 0
        self.train_paths, self.heldout_paths = (paths[:-n_out], paths[-n_out:]) if n_out else (paths, paths)
        space = cfg.space or cfg.atlas
        reference = read_image(space, "data.space" if cfg.space else "data.atlas") if space else read_image(self.train_paths[0], "data.root")
        self.reference, self.space = reference, Path(space) if space else self.train_paths[0]
        if cfg.align == "affine":
            self.preprocess = dataclasses.replace(self.preprocess, direction=tuple(reference.GetDirection()))
        self.grid = model_grid(reference, self.preprocess)
        self.shape = tuple(reversed(self.grid.size))
        self.dim = reference.GetDimension()
        self.atlas = self._prepared(Path(cfg.atlas), "data.atlas") if cfg.atlas else None
        self.images = self._load(self.train_paths)  # one (1, 1, *shape) tensor per scan
        self.settings = AugmentSettings(deform=cfg.deform, smoothness=cfg.smoothness, affine=cfg.augment,
                                        flips=cfg.flips, permute=cfg.permute, intensity=cfg.intensity_augment)

    def _load(self, paths) -> list[torch.Tensor]:
        return [self._prepared(p) for p in paths]

    def _prepared(self, path: Path, role: str = "scan") -> torch.Tensor:
        cached = self._cache_file(path) if self.cfg.cache else None
        if cached is not None and cached.is_file():
            return torch.from_numpy(np.load(cached, mmap_mode="c"))
        image = read_image(path, role)
        if image.GetDimension() != self.dim:
            raise DataError(f"{role} {path} is {image.GetDimension()}D; the other scans are {self.dim}D")
        transform = None
        if self.cfg.align == "affine" and Path(path).resolve() != self.space.resolve():
            transform = affine_register(self.reference, image, names=("the space", f"{role} {path}")).transform()
        tensor = prepare(image, self.grid, self.preprocess, f"{role} {path}", transform)
        if cached is not None:
            with atomic_path(cached) as tmp:
                np.save(tmp, tensor.numpy())
            return torch.from_numpy(np.load(cached, mmap_mode="c"))
        return tensor

    def _cache_file(self, path: Path) -> Path:
        folder = Path(self.cfg.cache)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"data.cache {folder}: cannot create the folder ({err.strerror})") from None
        stat = Path(path).stat()
        key = json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, self.preprocess.to_dict(),
                          dataclasses.astuple(self.grid), self.cfg.align, str(self.space)], default=str)
        return folder / f"{Path(path).name.split('.')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"

    def _pick(self, images: list, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.atlas is not None:
            return images[int(torch.randint(len(images), (1,), generator=generator))], self.atlas
        if len(images) == 1:
            return images[0], images[0]
        first, second = random_pairs(len(images), 1, generator)[0].tolist()
        return images[first], images[second]

    def pair(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented pair ``(moving, fixed)``, each ``(1, 1, *shape)``, drawn with ``generator``."""
        moving, fixed = self._pick(self.images, generator)
        with torch.no_grad():
            moving, fixed, _ = augment_pair(moving.clone(), fixed.clone(), self.settings, generator)
        return moving, fixed

    def summary(self) -> dict:
        """What the model was trained on, for the model file's header."""
        return {"dataset": "folder", "root": self.cfg.root, "pattern": self.cfg.pattern, "atlas": self.cfg.atlas,
                "space": self.cfg.space, "align": self.cfg.align, "all_scans": [str(p) for p in self.train_paths],
                "scans": len(self.train_paths), "heldout_scans": 0 if self.heldout_paths is self.train_paths else len(self.heldout_paths),
                "first_scans": [str(p) for p in self.train_paths[:3]], "shape": list(self.shape)}

    def heldout(self):
        """``data.val_pairs`` augmented pairs of the held-out scans, from a seed of their own."""
        images = self.images if self.heldout_paths is self.train_paths else self._load(self.heldout_paths)
        generator = torch.Generator().manual_seed(self.cfg.seed + HELDOUT_SEED)
        pairs = []
        for _ in range(self.cfg.val_pairs):
            moving, fixed = self._pick(images, generator)
            with torch.no_grad():
                pairs.append(augment_pair(moving.clone(), fixed.clone(), self.settings, generator)[:2])
        return torch.cat([m for m, _ in pairs]), torch.cat([f for _, f in pairs])
