"""Model files: safetensors weights with a JSON header; loading never unpickles or runs code.

Header keys (all strings, as safetensors stores them): ``format`` (``"cyclereg-model"``),
``format_version``, ``cyclereg_version``, ``config`` (the training config as JSON), ``dim``,
``shape`` (the model grid's shape in training, tensor order), ``preprocess`` (the preprocessing of
:class:`~cyclereg.io.preprocess.Preprocessing` as JSON: intensity normalisation, model spacing, padding)
``training`` (what the model was trained on and for how long, as JSON; absent in older files),
``tuning`` (the instance optimisation it registers with by default, field name -> value of
:class:`~cyclereg.registration.tuning.InstanceOptimisation`; only where chosen for it, as for a shipped model),
``provenance`` (a shipped model's commit, training subjects and held-out scores, as JSON; only in shipped
models, :mod:`cyclereg.models.shipped`) and ``weights_sha256``. Format version 1 (before ``preprocess``) had ``intensity``, the input range.
The format is described for users in ``docs/model_format.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cyclereg.core.version import __version__
from cyclereg.core.atomic import atomic_path
from cyclereg.core.config import Config, config_from_dict
from cyclereg.core.errors import CycleregError, DataError, UsageError
from cyclereg.models.registration import RegistrationModel, build_model, use_channels_last
from cyclereg.io.preprocess import Preprocessing

FORMAT = "cyclereg-model"
FORMAT_VERSION = 3

__all__ = ["ModelInfo", "save_model", "load_model", "read_header", "weights_digest", "read_init", "initialise_from"]


@dataclass
class ModelInfo:
    config: Config
    shape: tuple
    preprocess: Preprocessing = Preprocessing()
    training: dict = field(default_factory=dict)  # data summary, steps, processes, data wait, final held-out scores
    field_units: str = "voxels"  # how the networks' outputs are read (methods.Step); "domain" before format 3
    tuning: dict = field(default_factory=dict)  # the model's own instance optimisation defaults (registration.tuning.defaults)

    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def intensity(self) -> tuple:
        return self.preprocess.range


def weights_digest(tensors: dict) -> str:
    """SHA-256 over the weights' names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_from_info(info: ModelInfo) -> RegistrationModel:
    m = info.config.model
    steps = [{"network": s.network, "downsample": s.downsample, "params": s.params} for s in m.steps]
    return build_model(steps, info.dim, info.shape, method=m.method, shared=m.shared, units=info.field_units, svf=m.svf)


def save_model(path, model: RegistrationModel, info: ModelInfo, provenance: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "cyclereg_version": __version__,
        "config": json.dumps(info.config.to_dict()),
        "dim": str(info.dim),
        "shape": json.dumps(list(info.shape)),
        "preprocess": json.dumps(info.preprocess.to_dict()),
        "training": json.dumps(info.training),
        "field_units": info.field_units,
        "weights_sha256": weights_digest(tensors),
        **({"tuning": json.dumps(info.tuning)} if info.tuning else {}),
        **({"provenance": json.dumps(provenance)} if provenance else {}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_header(path) -> dict:
    """A model file's header (strings), without its weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DataError(f"model file {path} is not a cyclereg model (cannot read safetensors: {err})") from None


def load_model(path, device="cpu") -> tuple[RegistrationModel, ModelInfo]:
    """Load a model file written by :func:`save_model`, in evaluation mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"model file {path} does not exist" if not path.exists() else f"model file {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DataError(f"model file {path} is not a cyclereg model (cannot read safetensors: {err})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"model file {path} is not a cyclereg model (no '{FORMAT}' header)")
    version = meta.get("format_version", "?")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise DataError(f"model file {path} has format version {version}; this cyclereg {__version__} reads up to {FORMAT_VERSION}")
    if weights_digest(tensors) != meta.get("weights_sha256"):
        raise DataError(f"model file {path}: weights do not match their SHA-256 (file altered or damaged)")
    try:
        if version == "1":
            prep = Preprocessing(range=tuple(json.loads(meta["intensity"])))
        else:
            prep = Preprocessing.from_dict(json.loads(meta["preprocess"]))
        info = ModelInfo(config_from_dict(json.loads(meta["config"])), tuple(json.loads(meta["shape"])), prep,
                         json.loads(meta.get("training", "{}")), meta.get("field_units", "domain"),
                         json.loads(meta.get("tuning", "{}")))
        if not isinstance(info.tuning, dict):
            raise ValueError(f"its 'tuning' is {type(info.tuning).__name__}, expected a JSON object")
        model = build_from_info(info)
        model.load_state_dict(tensors)
    except (CycleregError, KeyError, ValueError, RuntimeError, TypeError) as err:
        raise DataError(f"model file {path} has an inconsistent header or weights: {err}") from None
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        use_channels_last(model, info.dim)
    return model, info


def _step_grid(info: ModelInfo, step) -> str:
    """The grid a step's network sees: the model spacing times the step's downsampling."""
    spacing = info.preprocess.spacing
    if not spacing:
        return f"the image's own grid downsampled {step.downsample}x"
    return "x".join(f"{s * step.downsample:g}" for s in spacing) + " mm"


def read_init(path) -> tuple[RegistrationModel, ModelInfo]:
    """The model file of ``train.init``, read (errors name ``train.init``)."""
    try:
        return load_model(path)
    except DataError as err:
        raise DataError(f"train.init: {err}") from None


def _networks(model_cfg) -> tuple[bool, bool]:
    """What holds a model's steps: ``(CycleMorph pair of networks, one shared network)``."""
    cyclemorph = model_cfg.method == "cyclemorph"
    return cyclemorph, cyclemorph and model_cfg.shared


def initialise_from(model, info: ModelInfo, path, init=None) -> int:
    """Copy the weights of the model file ``path`` into the first steps of ``model`` (built from
    ``info``, the config of ``train.init``). A model of ``K`` steps initialises steps ``0..K-1``: they
    must have the same networks and see grids of the same spacing, since networks predict in voxels
    of the grid they see (a 4 mm model's steps, downsampled 2, 2, 1, start a 2 mm model's steps
    downsampled 4, 4, 2). The other steps keep their initial weights. ``init``: the file already read
    by :func:`read_init`. Returns ``K``."""
    where = f"train.init {path}"
    source, src = init or read_init(path)
    if src.dim != info.dim:
        raise UsageError(f"{where} is a {src.dim}D model; this config trains on {info.dim}D images")
    if src.field_units != info.field_units:
        raise UsageError(f"{where} is an older model file whose networks predict in domain units; it cannot start a new model")
    a, b = src.config.model, info.config.model
    if _networks(a) != _networks(b):
        raise UsageError(f"{where}: method {a.method}{' (shared network)' if _networks(a)[1] else ''}; "
                         f"this config trains {b.method}{' (shared network)' if _networks(b)[1] else ''}, whose networks differ")
    if a.svf != b.svf:
        raise UsageError(f"{where}: model.svf is {str(a.svf).lower()} there and {str(b.svf).lower()} here; "
                         f"its networks predict {'velocities' if a.svf else 'displacements'}")
    if len(a.steps) > len(b.steps):
        raise UsageError(f"{where} has {len(a.steps)} steps; model.steps has only {len(b.steps)}")
    for k, (s_a, s_b) in enumerate(zip(a.steps, b.steps)):
        if (s_a.network, s_a.params) != (s_b.network, s_b.params):
            raise UsageError(f"{where}: its step {k} is a {s_a.network} with {s_a.params}; model.steps[{k}] is a "
                             f"{s_b.network} with {s_b.params}")
        if _step_grid(src, s_a) != _step_grid(info, s_b):
            raise UsageError(f"{where}: its step {k} sees a grid of {_step_grid(src, s_a)}, model.steps[{k}] one of "
                             f"{_step_grid(info, s_b)}; networks predict in voxels of the grid they see, so set "
                             f"model.steps[{k}].downsample to match")
    state, weights = model.state_dict(), source.state_dict()
    for name, value in weights.items():
        if name not in state or state[name].shape != value.shape:
            raise UsageError(f"{where}: its weight {name} {tuple(value.shape)} has no counterpart in this model "
                             "(networks built for a fixed image shape only transfer at that shape)")
        state[name] = value
    model.load_state_dict(state)
    return len(a.steps)
