"""The models that ship with cyclereg: one safetensors file per model in the package's ``models/weights``
folder (installed with the package, wheels included), each with its provenance in its header (the
config, the commit, the training subjects, the steps and the held-out scores; :func:`ship`). ``register``,
``evaluate`` and the Python API use :data:`DEFAULT` when no model is given (and register without a network
where none ships); ``cyclereg models`` lists them.
"""

from __future__ import annotations

import json
from pathlib import Path

from cyclereg.core.errors import DataError
from cyclereg.models.modelfile import load_model, read_header, save_model

__all__ = ["FOLDER", "DEFAULT", "shipped", "default_model", "describe", "ship"]

FOLDER = Path(__file__).resolve().parent / "weights"
DEFAULT = "brain_t1"  # the model used without --model: 3D brain T1, inter-subject, after the affine stage
MAX_BYTES = 20 * 2**20  # a shipped model stays small


def shipped(folder: Path | None = None) -> dict[str, Path]:
    """Name -> file of every shipped model."""
    folder = FOLDER if folder is None else folder
    return {p.name.removesuffix(".safetensors"): p for p in sorted(folder.glob("*.safetensors"))}


def default_model(folder: Path | None = None) -> Path | None:
    """The file of the default shipped model, or None where this installation has none (``register`` then
    runs without a network: :mod:`cyclereg.registration.networkfree`)."""
    return shipped(folder).get(DEFAULT)


def describe(path: Path) -> dict:
    """What a shipped model's header says: its name, size, method, grid, default instance optimisation and provenance."""
    header = read_header(path)
    config = json.loads(header.get("config", "{}"))
    provenance = json.loads(header.get("provenance", "{}"))
    preprocess = json.loads(header.get("preprocess", "{}"))
    return {"name": path.name.removesuffix(".safetensors"), "file": str(path), "megabytes": round(path.stat().st_size / 2**20, 2),
            "method": config.get("model", {}).get("method"), "dim": int(header.get("dim", 0)),
            "spacing_mm": preprocess.get("spacing"), "cyclereg_version": header.get("cyclereg_version"),
            "tuning": json.loads(header.get("tuning", "{}")), **provenance}


def ship(source, name: str, provenance: dict, folder: Path | None = None, tuning: dict | None = None) -> Path:
    """Copy the model file ``source`` into the shipped folder as ``name``, with ``provenance`` in its header
    (replacing an earlier model of that name) and ``tuning``, the instance optimisation it registers with
    by default (field name -> value; chosen on the held-out pairs it was scored on). Refuses a file over 20 MB."""
    model, info = load_model(source)
    info.tuning = dict(tuning or {})
    folder = FOLDER if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.safetensors"
    save_model(out, model, info, provenance={**provenance, "training": info.training})
    size = out.stat().st_size
    if size > MAX_BYTES:
        out.unlink()
        raise DataError(f"model {source} is {size / 2**20:.1f} MB; a shipped model stays under 20 MB")
    return out
