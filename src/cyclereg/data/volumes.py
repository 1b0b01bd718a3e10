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
import SimpleITK as sitk
import torch

from cyclereg.core.atomic import atomic_path
from cyclereg.data.augment import AugmentSettings, augment_pair
from cyclereg.core.errors import DataError
from cyclereg.data.common import HELDOUT_SEED, preprocessing, random_pairs
from cyclereg.io.images import read_image
from cyclereg.io.preprocess import model_grid, prepare, resample
from cyclereg.losses.labels import label_indices
from cyclereg.registration.affine import affine_register

__all__ = ["scan_table", "ScanSet"]


def scan_table(cfg) -> list[tuple[Path, Path | None]]:
    """The scans named by ``data.root``, each with its label map or None: a folder (files matching
    ``data.pattern``, no labels) or a CSV file with a column ``image`` and optionally ``labels`` (paths
    relative to the CSV's folder; an empty cell: no label map)."""
    root = Path(cfg.root)
    if root.is_dir():
        paths = sorted(p for p in root.glob(cfg.pattern) if p.is_file())
        if not paths:
            raise DataError(f"data.root {root} holds no file matching data.pattern {cfg.pattern!r}")
        return [(p, None) for p in paths]
    if root.is_file() and root.suffix.lower() == ".csv":
        with root.open(newline="") as f:
            reader = csv.DictReader(f)
            if "image" not in (reader.fieldnames or []):
                raise DataError(f"data.root {root}: the CSV has no column 'image'")
            rows = [(root.parent / row["image"], root.parent / row["labels"] if row.get("labels") else None)
                    for row in reader if row.get("image")]
        if not rows:
            raise DataError(f"data.root {root} lists no images")
        return rows
    raise DataError(f"data.root {root} is neither a folder nor a CSV file")


class ScanSet:
    """Scans on one model grid; pairs drawn with a seeded generator and augmented.

    With ``data.label_list``, each scan's label map (CSV column ``labels``) is resampled onto the model grid
    through the scan's alignment (nearest neighbour) as indices into the list, augmented with its scan, and
    pairs come with them: ``(moving, fixed, moving_labels, fixed_labels)`` (a scan without labels: all 0).

    With ``data.cache`` set, each prepared scan (and label map) is kept there as a ``.npy`` file named by a
    hash of the scan file (path, size, modification time), the preprocessing and the model grid, and read
    back memory-mapped: later runs start at once, and the processes of a distributed run share the pages."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.preprocess = preprocessing(cfg)
        rows = scan_table(cfg)
        if not cfg.label_list:
            rows = [(image, None) for image, _ in rows]
        n_out = max(1, math.ceil(cfg.holdout * len(rows))) if len(rows) >= 4 else 0
        self.train_rows, self.heldout_rows = (rows[:-n_out], rows[-n_out:]) if n_out else (rows, rows)
        self.train_paths = [image for image, _ in self.train_rows]
        if cfg.label_list and not any(labels for _, labels in self.train_rows):
            raise DataError(f"data.label_list is set, but no training scan of data.root {cfg.root} has a label map "
                            "(CSV column 'labels')")
        if cfg.label_list and cfg.atlas:
            raise DataError("data.label_list with data.atlas: label supervision needs the atlas's labels, "
                            "which cyclereg does not read yet; train pairs of scans (no data.atlas)")
        space = cfg.space or cfg.atlas
        reference = read_image(space, "data.space" if cfg.space else "data.atlas") if space else read_image(self.train_paths[0], "data.root")
        self.reference, self.space = reference, Path(space) if space else self.train_paths[0]
        if cfg.align == "affine":
            self.preprocess = dataclasses.replace(self.preprocess, direction=tuple(reference.GetDirection()))
        self.grid = model_grid(reference, self.preprocess)
        self.shape = tuple(reversed(self.grid.size))
        self.dim = reference.GetDimension()
        self.atlas = self._prepared(Path(cfg.atlas), "data.atlas")[0] if cfg.atlas else None
        self.images, self.labels = self._load(self.train_rows)  # one (1, 1, *shape) tensor per scan
        self.settings = AugmentSettings(deform=cfg.deform, smoothness=cfg.smoothness, affine=cfg.augment,
                                        flips=cfg.flips, permute=cfg.permute, intensity=cfg.intensity_augment)

    def _load(self, rows) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        prepared = [self._prepared(image, "scan", labels) for image, labels in rows]
        none = torch.zeros((1, 1, *self.shape), dtype=torch.uint8)
        return [image for image, _ in prepared], [none if labels is None else labels for _, labels in prepared]

    def _prepared(self, path: Path, role: str = "scan", labels: Path | None = None):
        """``(scan, label indices or None)`` on the model grid, ``(1, 1, *shape)`` float32 and uint8."""
        files = self._cache_files(path, labels) if self.cfg.cache else []
        if files and all(f.is_file() for f in files):
            loaded = [torch.from_numpy(np.load(f, mmap_mode="c")) for f in files]
            return loaded[0], (loaded[1] if labels else None)
        image = read_image(path, role)
        if image.GetDimension() != self.dim:
            raise DataError(f"{role} {path} is {image.GetDimension()}D; the other scans are {self.dim}D")
        transform = None
        if self.cfg.align == "affine" and Path(path).resolve() != self.space.resolve():
            transform = affine_register(self.reference, image, names=("the space", f"{role} {path}")).transform()
        tensors = [prepare(image, self.grid, self.preprocess, f"{role} {path}", transform)]
        if labels is not None:
            label_map = read_image(labels, f"labels of {role} {path}")
            values = sitk.GetArrayFromImage(resample(label_map, self.grid, nearest=True, transform=transform))
            tensors.append(label_indices(torch.from_numpy(values.astype(np.int64)), self.cfg.label_list)[None, None])
        if files:
            for file, tensor in zip(files, tensors):
                with atomic_path(file) as tmp:
                    np.save(tmp, tensor.numpy())
            tensors = [torch.from_numpy(np.load(f, mmap_mode="c")) for f in files]
        return tensors[0], (tensors[1] if labels else None)

    def _cache_files(self, path: Path, labels: Path | None) -> list[Path]:
        """The cache file of the scan, and of its label map if it has one."""
        folder = Path(self.cfg.cache)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"data.cache {folder}: cannot create the folder ({err.strerror})") from None
        stat = Path(path).stat()
        key = json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, self.preprocess.to_dict(),
                          dataclasses.astuple(self.grid), self.cfg.align, str(self.space)], default=str)
        name = Path(path).name.split(".")[0]
        files = [folder / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"]
        if labels is not None:
            stat = Path(labels).stat()
            key = json.dumps([key, str(Path(labels).resolve()), stat.st_size, stat.st_mtime_ns, list(self.cfg.label_list)])
            files.append(folder / f"{name}-labels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy")
        return files

    def _pick(self, labels: list, generator: torch.Generator) -> tuple[int, int | None]:
        """Indices of the (moving, fixed) scans of a pair; fixed None: the atlas. With ``data.label_pairs``,
        that share of the pairs is drawn among the scans with labels (two or more of them)."""
        n = len(labels)
        if self.atlas is not None:
            return int(torch.randint(n, (1,), generator=generator)), None
        if n == 1:
            return 0, 0
        if self.cfg.label_pairs and float(torch.rand(1, generator=generator)) < self.cfg.label_pairs:
            labelled = [k for k, lab in enumerate(labels) if lab.any()]
            if len(labelled) >= 2:
                first, second = random_pairs(len(labelled), 1, generator)[0].tolist()
                return labelled[first], labelled[second]
        first, second = random_pairs(n, 1, generator)[0].tolist()
        return first, second

    def _augmented(self, images, labels, generator) -> tuple:
        i, j = self._pick(labels, generator)
        moving, fixed = images[i], self.atlas if j is None else images[j]
        with torch.no_grad():
            if not self.cfg.label_list:
                return augment_pair(moving.clone(), fixed.clone(), self.settings, generator)[:2]
            out = augment_pair(moving.clone(), fixed.clone(), self.settings, generator, (labels[i], labels[j]))
        return out[0], out[1], *out[3]

    def pair(self, generator: torch.Generator) -> tuple:
        """One augmented pair ``(moving, fixed)``, each ``(1, 1, *shape)``, drawn with ``generator``; with
        ``data.label_list``, ``(moving, fixed, moving_labels, fixed_labels)``."""
        return self._augmented(self.images, self.labels, generator)

    def summary(self) -> dict:
        """What the model was trained on, for the model file's header."""
        out = {"dataset": "folder", "root": self.cfg.root, "pattern": self.cfg.pattern, "atlas": self.cfg.atlas,
               "space": self.cfg.space, "align": self.cfg.align, "all_scans": [str(p) for p in self.train_paths],
               "scans": len(self.train_paths),
               "heldout_scans": 0 if self.heldout_rows is self.train_rows else len(self.heldout_rows),
               "first_scans": [str(p) for p in self.train_paths[:3]], "shape": list(self.shape)}
        if self.cfg.label_list:
            out.update(label_list=list(self.cfg.label_list),
                       labelled_scans=[str(image) for image, labels in self.train_rows if labels])
        return out

    def heldout(self):
        """``data.val_pairs`` augmented pairs of the held-out scans, from a seed of their own (images only)."""
        images, labels = (self.images, self.labels) if self.heldout_rows is self.train_rows else self._load(self.heldout_rows)
        generator = torch.Generator().manual_seed(self.cfg.seed + HELDOUT_SEED)
        pairs = [self._augmented(images, labels, generator)[:2] for _ in range(self.cfg.val_pairs)]
        return torch.cat([m for m, _ in pairs]), torch.cat([f for _, f in pairs])
