"""Registering every pair of a CSV with one loaded model (``register --pairs-csv``): outputs named per pair,
one writer per output folder, and reruns after a crash that do only the pairs left."""

from __future__ import annotations

from pathlib import Path

from cyclereg.core.errors import DataError, UsageError
from cyclereg.core.atomic import make_folder
from cyclereg.core.locks import folder_lock
from cyclereg.io.pairs import each_row, read_pairs_csv
from cyclereg.registration.register import register_files
from cyclereg.registration.tuning import NO_IO, InstanceOptimisation

__all__ = ["OUTPUT_NAMES", "register_csv"]


OUTPUT_NAMES = {"warped": "warped.nii.gz", "transform": "transform.h5", "transform_inverse": "transform_inverse.h5",
                "jacobian": "jacobian.nii.gz", "figure": "figure.png"}


def register_csv(model, info, csv_path, out_dir, outputs=("warped", "transform"), tuning: InstanceOptimisation = NO_IO,
                 rank: int = 0, world: int = 1, progress: bool = True, affine: str = "auto", affine_similarity: str = "ncc",
                 overwrite: bool = False, device=None):
    """Register every pair of a CSV (columns ``fixed``, ``moving``, optional ``moving_labels``, ``name``
    and ``affine``: a prior transform file for that pair, else ``affine``) with one loaded model,
    (None: without a network, on ``device``), streaming: pair after pair, nothing kept between pairs. Outputs
    go to ``out_dir/NAME_warped.nii.gz`` and so on (``NAME``: the ``name`` column, or the moving and
    fixed file names). With ``world`` processes, this one takes rows ``rank, rank + world, ...``.
    A batch rerun after a crash skips the pairs whose outputs are all there (each is written whole or not
    at all), unless ``overwrite``. Yields one summary per pair (``"skipped": true`` for those)."""
    out_dir = make_folder(out_dir, "--out-dir")
    unknown = sorted(set(outputs) - set(OUTPUT_NAMES))
    if unknown or not outputs:
        raise UsageError(f"--outputs: expected some of {', '.join(OUTPUT_NAMES)}, got {','.join(outputs) or 'nothing'}")
    rows = read_pairs_csv(csv_path)
    names = [row.get("name") and Path(row["name"]).name or
             f"{_stem(row['moving'])}_to_{_stem(row['fixed'])}" for row in rows]
    seen = {}
    for line, name in enumerate(names, start=2):
        if name in seen:
            raise DataError(f"--pairs-csv {csv_path}, line {line}: output name {name!r} is also that of line "
                            f"{seen[name]}; add a column 'name'")
        seen[name] = line
    def one(i):
        row, name = rows[i], names[i]
        labels = row.get("moving_labels") or None
        files = {k: out_dir / f"{name}_{OUTPUT_NAMES[k]}" for k in outputs}
        labels_out = out_dir / f"{name}_warped_labels.nii.gz" if labels else None
        if not overwrite and all(f.is_file() for f in [*files.values(), *([labels_out] if labels else [])]):
            return {"name": name, "fixed": row["fixed"], "moving": row["moving"], "skipped": True}
        summary = register_files(model, info, row["fixed"], row["moving"], moving_labels=labels,
                                 warped_labels=labels_out,
                                 tuning=tuning, affine=row.get("affine") or affine, affine_similarity=affine_similarity,
                                 device=device, **{k: str(v) for k, v in files.items()})
        return {"name": name, "fixed": row["fixed"], "moving": row["moving"], **summary}

    with folder_lock(out_dir, "--out-dir", enabled=rank == 0):
        yield from (summary for _, summary in each_row(csv_path, range(rank, len(rows), world), one, "register", progress))


def _stem(path) -> str:
    return Path(path).name.split(".")[0]
