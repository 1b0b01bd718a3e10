"""Training configuration: TOML files read into typed dataclasses, with validation.

Unknown keys, wrong types and out-of-range values raise :class:`~cyclereg.core.errors.UsageError` naming
the key. ``--set key=value`` overrides use TOML syntax for the value (``--set model.lam=512``,
``--set data.root='"/data/mnist"'`` or simply ``--set data.root=/data/mnist``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from cyclereg.core.errors import UsageError

__all__ = ["DataConfig", "StepConfig", "ModelConfig", "StageConfig", "TrainConfig", "Config",
           "load_config", "config_from_dict", "apply_overrides", "DEFAULT_LAM", "METHOD_NAMES", "SIMILARITY_NAMES",
           "NETWORK_NAMES", "INTENSITY_MODES"]


# The names a config may use. The registries behind them (models.methods.METHODS, losses.SIMILARITIES,
# models.networks.NETWORKS, io.preprocess) sit in higher layers; tests/test_config.py checks that they agree.
METHOD_NAMES = ("icon", "gradicon", "diffusion", "cyclemorph")
SIMILARITY_NAMES = ("mse", "ncc", "lncc", "lncc_box")
NETWORK_NAMES = ("unet", "mlp", "encdec", "convonly", "voxelmorph")
INTENSITY_MODES = ("minmax", "percentile", "window", "none")

# λ when a config does not set model.lam, per method: the authors' own defaults or examples. ICON:
# 2048 (its triangles example); GradICON: 1.5 (uniGradICON, with the authors' GradientICON scale);
# diffusion: 0.01 (VoxelMorph's train script, NCC); CycleMorph: λ_R = 1 (its train options).
DEFAULT_LAM = {"icon": 2048.0, "gradicon": 1.5, "diffusion": 0.01, "cyclemorph": 1.0}


@dataclass
class DataConfig:
    dataset: str = "triangles"  # "triangles", "mnist" or "folder" (scans in any format SimpleITK reads)
    root: str = ""  # mnist: folder of the IDX files; folder: a folder of scans or a CSV (column image)
    pattern: str = "*.nii.gz"  # folder: which files of the folder are scans
    atlas: str = ""  # folder: register every scan to this fixed image (empty: pairs of scans)
    align: str = "none"  # folder: "affine": align every scan affinely to the space (scans in their own spaces)
    space: str = ""  # folder: the image whose grid and frame the scans share (default: data.atlas, else the first scan)
    digit: int = 5  # mnist: the digit to register
    holdout: float = 0.1  # mnist, folder: fraction of the images kept out for validation
    size: int = 128  # triangles: image size
    n_train: int = 6000  # triangles: number of training images
    val_pairs: int = 64  # held-out pairs scored during training
    # Preprocessing (folder; stored in the model file and applied the same way at registration)
    intensity: str = "minmax"  # minmax, percentile (MR), window (CT) or none
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # percentile: the clamp
    window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])  # window: the clamp (CT: HU)
    spacing: list[float] = field(default_factory=list)  # model voxel spacing in mm (x, y, z); empty: the scans'
    pad_multiple: int = 1  # the model grid's size is a multiple of this
    # Augmentation (seeded)
    augment: float = 0.0  # strength of random affine augmentation of training images (0: none)
    deform: float = 0.0  # folder: RMS of random smooth deformations, in model voxels (0: none)
    smoothness: int = 5  # folder: control points per axis of the random deformations
    flips: bool = False  # folder: random axis flips (the same for both images of a pair)
    permute: bool = False  # folder: random axis permutations (cubic model grids only)
    intensity_augment: bool = False  # folder: random gamma, scale and noise per image
    seed: int = 0  # data generation and held-out pairs
    cache: str = ""  # folder: keep prepared scans there, memory-mapped (empty: in memory only)
    label_list: list[int] = field(default_factory=list)  # folder: label values supervised (CSV column labels)
    label_pairs: float = 0.0  # folder: share of the pairs drawn among the scans with labels (the rest: all scans)


@dataclass
class StepConfig:
    network: str = "unet"  # unet, mlp, encdec, convonly
    downsample: int = 1  # 1: full resolution, 2: images halved
    params: dict = field(default_factory=dict)  # network arguments, e.g. channels = [16, 32, 64]


@dataclass
class ModelConfig:
    method: str = "icon"  # icon, gradicon, diffusion, cyclemorph
    similarity: str = "mse"  # mse, ncc, lncc, lncc_box
    lam: float = math.nan  # weight of the regulariser (λ; λ_R for CycleMorph); unset: DEFAULT_LAM[method]
    noise: float = 0.0  # icon: map noise ε in voxels (ICON §2.3)
    sigma: float = 2.0  # lncc: Gaussian window in voxels
    window: int = 9  # lncc_box: box window in voxels
    alpha: float = 0.1  # cyclemorph: weight of the cycle loss
    beta: float = 0.5  # cyclemorph: weight of the identity loss
    shared: bool = False  # cyclemorph: one network for both directions instead of two
    label_weight: float = 0.0  # weight of 1 - Dice of the warped labels (data.label_list; 0: images only)
    svf: bool = False  # each step's network predicts a stationary velocity field, integrated by scaling and squaring
    steps: list[StepConfig] = field(default_factory=lambda: [StepConfig()])

    def __post_init__(self):
        if math.isnan(self.lam):  # TOML has no NaN-free "unset", and a NaN given is refused by _convert
            self.lam = DEFAULT_LAM.get(self.method, math.nan)


@dataclass
class StageConfig:
    fraction: float = 1.0  # share of train.steps spent in this stage
    lam: float = -1.0  # regulariser weight in this stage; negative: model.lam
    train: list[int] = field(default_factory=list)  # indices of the model steps trained; empty: all
    patch: list[int] = field(default_factory=list)  # voxels per axis: train the local steps on random patches


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's (CycleMorph's authors: 0.5, 0.999)
    lr_schedule: str = "constant"  # constant, or cosine: decays to 0 over each stage (train.stages)
    warmup: int = 0  # steps of linear warm-up at the start of each stage
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    workers: int = 2  # threads preparing batches ahead of the training step (0: in the loop)
    precision: str = "float32"  # float32, or bfloat16 (autocast; for GPUs)
    checkpointing: bool = False  # recompute activations in the backward pass (less memory, more time)
    init: str = ""  # a model file whose K steps initialise this model's steps 0..K-1 (empty: random weights)
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_lams(self) -> list[float]:
        """λ of each training stage (one stage if ``train.stages`` is empty); a stage without its own
        λ uses ``model.lam``."""
        return [s.lam if s.lam >= 0 else self.model.lam for s in self.train.stages] or [self.model.lam]

    def final_lam(self) -> float:
        """λ of the last training stage: the weight the trained model's regulariser last had, which
        instance optimisation keeps."""
        return self.stage_lams()[-1]


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}.get(tp, str(tp))


def _show(value) -> str:
    """A value in an error message: its repr on one line, cut short if long."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = "<a number too long to show>"
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value, tp, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UsageError(f"config key {key!r}: expected a table, got {_show(value)}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UsageError(f"config key {key!r}: expected a list, got {_show(value)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise UsageError(f"config key {key!r}: expected a finite number, got {_show(value)}") from None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UsageError(f"config key {key!r}: expected {_type_name(tp)}, got {_show(value)}")
    if tp is float and not math.isfinite(value):
        raise UsageError(f"config key {key!r}: expected a finite number, got {_show(value)}")
    return value


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    if not isinstance(raw, dict):
        raise UsageError(f"config {prefix.rstrip('.') or 'file'}: expected a table, got {_show(raw)}")
    unknown = sorted((k for k in raw if k not in hints), key=str)
    if unknown:
        raise UsageError(f"config key {prefix + str(unknown[0])!r} is unknown; expected one of: {', '.join(hints)}")
    return cls(**{name: _convert(value, hints[name], prefix + name) for name, value in raw.items()})


def _check(cfg: Config) -> None:
    def need(ok, key, expected, value):
        if not ok:
            raise UsageError(f"config key {key!r}: expected {expected}, got {_show(value)}")

    d, m, t = cfg.data, cfg.model, cfg.train

    need(d.dataset in ("triangles", "mnist", "folder"), "data.dataset", "'triangles', 'mnist' or 'folder'", d.dataset)
    need(d.intensity in INTENSITY_MODES, "data.intensity", f"one of {list(INTENSITY_MODES)}", d.intensity)
    need(len(d.percentiles) == 2 and 0 <= d.percentiles[0] < d.percentiles[1] <= 100, "data.percentiles",
         "two increasing percentages", d.percentiles)
    need(len(d.window) == 2 and d.window[0] < d.window[1], "data.window", "two increasing values", d.window)
    need(all(s > 0 for s in d.spacing) and len(d.spacing) in (0, 2, 3), "data.spacing",
         "an empty list or 2 or 3 spacings > 0 (mm)", d.spacing)
    need(d.pad_multiple >= 1, "data.pad_multiple", "an integer >= 1", d.pad_multiple)
    need(d.align in ("none", "affine"), "data.align", "'none' or 'affine'", d.align)
    need(d.deform >= 0, "data.deform", "an RMS displacement >= 0 (voxels)", d.deform)
    need(d.smoothness >= 2, "data.smoothness", "at least 2 control points per axis", d.smoothness)
    need(d.digit in range(10), "data.digit", "an integer from 0 to 9", d.digit)
    need(0 < d.holdout < 1, "data.holdout", "a fraction between 0 and 1", d.holdout)
    need(d.size >= 8, "data.size", "an image size of at least 8", d.size)
    need(d.n_train >= 2, "data.n_train", "at least 2 images", d.n_train)
    need(d.val_pairs >= 1, "data.val_pairs", "at least 1", d.val_pairs)
    need(0 <= d.augment <= 0.5, "data.augment", "a strength between 0 and 0.5", d.augment)
    if d.dataset == "mnist":
        need(bool(d.root), "data.root", "the folder of the MNIST IDX files (set it with --set data.root=DIR)", d.root)
    if d.dataset == "folder":
        need(bool(d.root), "data.root", "a folder of scans or a CSV listing them (set it with --set data.root=DIR)", d.root)
    need(m.method in METHOD_NAMES, "model.method", f"one of {sorted(METHOD_NAMES)}", m.method)
    need(m.similarity in SIMILARITY_NAMES, "model.similarity", f"one of {sorted(SIMILARITY_NAMES)}", m.similarity)
    need(m.lam >= 0, "model.lam", "a weight >= 0", m.lam)
    need(m.noise >= 0, "model.noise", "a noise level >= 0 (voxels)", m.noise)
    need(m.sigma > 0, "model.sigma", "a window width > 0 (voxels)", m.sigma)
    need(m.window >= 1 and m.window % 2 == 1, "model.window", "an odd window size >= 1 (voxels)", m.window)
    need(m.alpha >= 0, "model.alpha", "a weight >= 0", m.alpha)
    need(m.beta >= 0, "model.beta", "a weight >= 0", m.beta)
    need(m.label_weight >= 0, "model.label_weight", "a weight >= 0", m.label_weight)
    need(len(set(d.label_list)) == len(d.label_list) <= 255 and all(v != 0 for v in d.label_list), "data.label_list",
         "at most 255 distinct label values other than 0 (background)", d.label_list)
    need(0 <= d.label_pairs <= 1 and (not d.label_pairs or d.label_list), "data.label_pairs",
         "a share between 0 and 1, with data.label_list", d.label_pairs)
    if m.label_weight > 0:
        need(d.dataset == "folder", "model.label_weight", "0 unless data.dataset = 'folder' (scans with label maps)", m.label_weight)
        need(bool(d.label_list), "data.label_list", "the label values to supervise (model.label_weight > 0)", d.label_list)
        need(not any(s.patch for s in t.stages), "model.label_weight", "0 with patch stages (train.stages[].patch)",
             m.label_weight)
    need(len(m.steps) >= 1, "model.steps", "at least one step", m.steps)
    for i, s in enumerate(m.steps):
        need(s.network in NETWORK_NAMES, f"model.steps[{i}].network", f"one of {sorted(NETWORK_NAMES)}", s.network)
        need(s.downsample in (1, 2, 4), f"model.steps[{i}].downsample", "1, 2 or 4", s.downsample)
    need(t.steps >= 1, "train.steps", "a number of steps >= 1", t.steps)
    need(t.batch_size >= 1, "train.batch_size", "a batch size >= 1", t.batch_size)
    need(t.lr > 0, "train.lr", "a learning rate > 0", t.lr)
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)", t.betas)
    need(t.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "'constant' or 'cosine'", t.lr_schedule)
    need(t.warmup >= 0, "train.warmup", "a number of steps >= 0", t.warmup)
    need(t.workers >= 0, "train.workers", "a number of threads >= 0", t.workers)
    need(t.precision in ("float32", "bfloat16"), "train.precision", "'float32' or 'bfloat16'", t.precision)
    for name in ("log_every", "val_every", "checkpoint_every"):
        need(getattr(t, name) >= 1, f"train.{name}", "a number of steps >= 1", getattr(t, name))
    if t.stages:
        total = sum(s.fraction for s in t.stages)
        need(abs(total - 1) < 1e-6, "train.stages", "fractions that add up to 1", [s.fraction for s in t.stages])
        for i, s in enumerate(t.stages):
            need(s.fraction > 0, f"train.stages[{i}].fraction", "a share > 0", s.fraction)
            for j in s.train:
                need(0 <= j < len(m.steps), f"train.stages[{i}].train", f"indices of model steps 0..{len(m.steps) - 1}", s.train)
            if s.patch:
                need(len(s.patch) in (2, 3) and all(p >= 4 for p in s.patch), f"train.stages[{i}].patch",
                     "2 or 3 patch sizes of at least 4 voxels", s.patch)
                first = min(s.train, default=0)
                need(first >= 1 and sorted(s.train) == list(range(first, len(m.steps))), f"train.stages[{i}].train",
                     "with a patch, the last steps of the model from some step >= 1 on (the earlier, global steps "
                     "register the whole image first)", s.train)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from nested dictionaries (as read from TOML)."""
    cfg = _build(Config, raw)
    _check(cfg)
    return cfg


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply ``key=value`` strings (TOML values; bare words are strings) to a nested dictionary."""
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected key=value, for example model.lam=512")
        if "\n" in text or "\r" in text:
            raise UsageError(f"--set {_show(item)}: expected one value on one line")
        try:
            parsed = tomllib.loads(f"v = {text}")
            value = parsed["v"] if list(parsed) == ["v"] else text
        except (tomllib.TOMLDecodeError, RecursionError, ValueError):  # not TOML: a bare string
            value = text
        node = raw
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r}: '{part}' is not a table")
        node[last] = value
    return raw


def load_config(path, overrides=()) -> Config:
    """Read a TOML config file, apply ``--set`` overrides, validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path} is a folder, expected a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None
