"""Inference benchmarks, side by side in one run: scaling with volume size, memory over many pairs,
FLOP/s of the networks, cyclereg against icon_registration (3D) and warping against MONAI's ``Warp``.

Sections (all when none is named):

* ``--shell``: `cyclereg register` from the shell on a 160×192×224 pair with the default 3D model
  (median wall time of fresh processes, peak memory).
* ``--scaling``: one pair through the default 3D model (the model section of ``configs/brain3d.toml``,
  untrained weights) at sizes from 32³ to 160×192×224: ``model(moving, fixed)`` (the map Φ) and Φ
  evaluated on the grid (``map_on_grid``), in evaluation mode under ``torch.inference_mode()``; median
  of the repeats after a warm-up. Every size runs in a fresh subprocess, which reports its peak RSS
  (``VmHWM``, not ``ru_maxrss``) and its RSS before the first forward. Growth exponent: least-squares slope of
  log(time) against log(voxels). Log-log plot: ``docs/scaling.png``.
* ``--memory``: one model file loaded once, then many pairs registered in one fresh process
  (``cyclereg.registration.instance.register_tensors``, Φ on the grid and the warped moving image), RSS from
  ``/proc/self/statm`` after each pair: first, last, max, slope over the last 80 % of the pairs.
* ``--flops``: FLOPs of one forward of the default model's networks (``FlopCounterMode``) over their
  measured time, against this machine's float32 matmul rate (``torch.mm``), the two alternating.
* ``--icon``: cyclereg against icon_registration's 3D GradICON (the ``tallUNet2`` networks, its 3D
  multi-step recipe of ``pretrained_models/lung_ct.make_network``: 1/4, 1/2, full, full resolution),
  one direction, map on the grid, no gradients; plus single networks of matched parameter counts.
* ``--monai``: ``cyclereg.core.transforms.warp`` against ``monai.networks.blocks.Warp`` on the same image
  and smooth displacement (checked to agree before timing).

Implementations being compared alternate call by call (the starting one rotating every round), and
medians are reported with their ratios, since the machine may be noisy. Sections needing
icon_registration or MONAI are skipped with a message when the import fails. Run from the benchmark
venv, which has both (see ``benchmarks/requirements-reference.txt``):

    .venv-bench/bin/python benchmarks/inference.py --append            # everything, full size
    .venv-bench/bin/python benchmarks/inference.py --scaling --append  # one section
    .venv-bench/bin/python benchmarks/inference.py --quick             # smoke test, small sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_report, machine  # noqa: E402

from cyclereg.core.config import load_config  # noqa: E402
from cyclereg.core.coords import identity_grid, voxel_scale  # noqa: E402
from cyclereg.models.registration import build_model, use_channels_last
from cyclereg.models.modelfile import ModelInfo, build_from_info  # noqa: E402
from cyclereg.models.networks import UNet  # noqa: E402
from cyclereg.core.transforms import DisplacementField, map_on_grid, sample, warp  # noqa: E402

CONFIG = ROOT / "configs" / "brain3d.toml"
MIB = 2**20

FULL = {
    "sizes": ["32", "48", "64", "96", "128", "160x192x224"], "repeats": 3, "rounds": 2, "fit_from": "64",
    "pairs": 100, "pair_size": "80x96x112",
    "flop_size": "80x96x112", "mm_size": 4096, "flop_repeats": 5,
    "icon_size": "80x96x112", "icon_repeats": 5,
    "warp_size": "160x192x224", "warp_repeats": 10,
    "plot": str(ROOT / "docs" / "scaling.png"), "shell_size": "224x192x160", "shell_repeats": 3,
}
QUICK = {
    "sizes": ["32", "40", "48", "64"], "repeats": 2, "rounds": 1, "fit_from": "48",
    "pairs": 12, "pair_size": "32",
    "flop_size": "48", "mm_size": 1024, "flop_repeats": 3,
    "icon_size": "72", "icon_repeats": 2,  # tallUNet2 pools 5 times at 1/4 resolution: 72 -> 18 -> ... -> 1
    "warp_size": "64", "warp_repeats": 5,
    "plot": str(Path(tempfile.gettempdir()) / "cyclereg_scaling_quick.png"), "shell_size": "64", "shell_repeats": 1,
}


# --------------------------------------------------------------------------------------------------
# pure helpers (tested in benchmarks/test_inference.py)
# --------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"64"`` -> ``(64, 64, 64)``; ``"80x96x112"`` -> ``(80, 96, 112)`` (tensor order D, H, W)."""
    parts = [int(p) for p in str(text).lower().replace("×", "x").split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or min(parts) < 2:
        raise ValueError(f"expected a 3D size like 64 or 80x96x112, got {text!r}")
    return tuple(parts)


def shape_name(shape) -> str:
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(str(n) for n in shape)


def linear_slope(x, y) -> float:
    """Least-squares slope of ``y`` against ``x`` (nan with fewer than two distinct ``x``)."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(set(x)) < 2:
        return math.nan
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def loglog_slope(x, y) -> float:
    """Growth exponent: least-squares slope of log(y) against log(x)."""
    return linear_slope([math.log(v) for v in x], [math.log(v) for v in y])


def growth_exponent(voxels, values, min_voxels: int = 0) -> float:
    """:func:`loglog_slope` over the points with at least ``min_voxels`` voxels."""
    kept = [(v, t) for v, t in zip(voxels, values) if v >= min_voxels]
    return loglog_slope([v for v, _ in kept], [t for _, t in kept])


def rss_summary(rss_mb) -> dict:
    """First, last, max and the slope (MB per pair) over the last 80 % of an RSS series."""
    n = len(rss_mb)
    tail = max(2, n - n // 5)
    start = n - tail
    return {"first": rss_mb[0], "last": rss_mb[-1], "max": max(rss_mb), "tail": tail,
            "slope": linear_slope(range(start, n), rss_mb[start:])}


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Call every function of ``fns`` once per round, the starting one rotating every round; return
    the timed seconds per name (the first ``warmup`` rounds are not timed)."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


# --------------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------------


def default_model(shape):
    """The default 3D model (``configs/brain3d.toml``'s model section), untrained, in eval mode, in the
    channels-last layout that ``load_model`` gives it on CPU."""
    cfg = load_config(CONFIG)
    info = ModelInfo(cfg, tuple(shape))
    torch.manual_seed(0)
    return _as_loaded(build_from_info(info).eval()), info


def _as_loaded(model):
    """A model as cyclereg runs it after ``load_model`` (channels-last layout on CPU)."""
    return use_channels_last(model, 3)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def smooth_volume(shape, generator, blobs: int = 6) -> torch.Tensor:
    """``(1, 1, *shape)`` sum of random Gaussian blobs scaled to [0, 1]."""
    x = identity_grid(shape)[0]
    img = torch.zeros(shape)
    for _ in range(blobs):
        c = 0.2 + 0.6 * torch.rand(3, generator=generator)
        s = 0.08 + 0.15 * torch.rand(1, generator=generator)
        r2 = sum((x[k] - c[k]) ** 2 for k in range(3))
        img += torch.exp(-r2 / (2 * s * s))
    return (img / img.max())[None, None]


def make_pair(shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return smooth_volume(shape, g), smooth_volume(shape, g)


def smooth_displacement(shape, voxels: float = 3.0) -> torch.Tensor:
    """``(1, 3, *shape)`` smooth displacement in cyclereg's domain units, up to ``voxels`` voxels."""
    x = identity_grid(shape)[0]
    comps = [torch.sin(2 * math.pi * (x[(k + 1) % 3] + 0.3 * k)) * torch.cos(math.pi * x[(k + 2) % 3]) for k in range(3)]
    return torch.stack(comps)[None] * voxels / voxel_scale(shape)


def closest_unet_widths(target: int, base=(16, 32, 64, 256), last=range(256, 1025, 16)) -> list[int]:
    """cyclereg 3D U-Net widths ``base + [w]`` whose parameter count is closest to ``target``
    (tallUNet2's encoder widths are 16, 32, 64, 256, 512)."""
    best = None
    for w in last:
        with torch.device("meta"):
            count = n_params(UNet(3, None, list(base) + [w]))
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), list(base) + [w])
    return best[1]


def rss_statm_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (``VmHWM``).

    Not ``ru_maxrss``: after ``exec`` that also counts the peak of the process that forked this one
    (the forked copy of its memory is the "old mm" whose high-water mark Linux keeps), so every
    subprocess of a large parent would report at least the parent's peak."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else rss_statm_mb()


# Runs `python -m cyclereg ...` and writes the process's own peak RSS (VmHWM) to stderr at exit.
PEAK_WRAPPER = """import atexit, runpy, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stderr.write('\\nPEAK_KIB ' + line.split()[1] + '\\n')
atexit.register(_peak)
runpy.run_module('cyclereg', run_name='__main__', alter_sys=True)
"""


# --------------------------------------------------------------------------------------------------
# workers (fresh subprocesses)
# --------------------------------------------------------------------------------------------------


def scaling_worker(shape, repeats: int, warmup: int) -> dict:
    model, _ = default_model(shape)
    moving, fixed = make_pair(shape)
    base = current_rss_mb()  # imports, model and images; the forward's memory comes on top
    phi_t, map_t = [], []
    with torch.inference_mode():
        for k in range(warmup + repeats):
            t0 = time.perf_counter()
            phi = model(moving, fixed)
            t1 = time.perf_counter()
            grid = map_on_grid(phi, shape, moving)
            t2 = time.perf_counter()
            del phi, grid
            if k >= warmup:
                phi_t.append(t1 - t0)
                map_t.append(t2 - t1)
    return {"shape": list(shape), "phi": phi_t, "map": map_t, "base_mb": base, "peak_mb": peak_rss_mb()}


def memory_worker(shape, pairs: int) -> dict:
    from cyclereg.models.modelfile import load_model, save_model

    model, info = default_model(shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(path, model, info)
        del model
        model, info = load_model(path)
    try:
        from cyclereg.registration.instance import register_tensors

        def register(m, f):
            return register_tensors(model, info, m, f)
        how = "cyclereg.registration.instance.register_tensors"
    except ImportError:  # the register module is being changed; fall back to the model itself
        def register(m, f):
            with torch.inference_mode():
                return model(m, f)
        how = "model(moving, fixed) under inference_mode (register_tensors not importable)"
    rss, seconds = [], []
    start = rss_statm_mb()
    for k in range(pairs):
        moving, fixed = make_pair(shape, seed=k)
        t0 = time.perf_counter()
        phi = register(moving, fixed)
        with torch.no_grad():
            grid = map_on_grid(phi, shape, moving)
            warped = sample(moving, grid)
        seconds.append(time.perf_counter() - t0)
        del phi, grid, warped, moving, fixed
        rss.append(rss_statm_mb())
    return {"shape": list(shape), "rss": rss, "seconds": seconds, "after_load": start, "how": how}


def run_worker(kind: str, args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# sections: each prints as it goes and returns a markdown body
# --------------------------------------------------------------------------------------------------


def section_scaling(opts) -> str:
    shapes = [parse_shape(s) for s in opts.sizes]
    fit_from = math.prod(parse_shape(opts.fit_from))
    print(f"\n[scaling] default 3D model ({CONFIG.name}), sizes {[shape_name(s) for s in shapes]}, "
          f"{opts.repeats} repeats after 1 warm-up, {opts.rounds} round(s), a subprocess per size and round", flush=True)
    runs = {s: [] for s in shapes}
    for r in range(opts.rounds):
        for s in shapes:
            res = run_worker("scaling", ["--shape", "x".join(map(str, s)), "--repeats", str(opts.repeats)])
            runs[s].append(res)
            print(f"  round {r + 1} {shape_name(s):>12}: Φ {statistics.median(res['phi']):.3f} s, map "
                  f"{statistics.median(res['map']):.3f} s, peak RSS {res['peak_mb']:.0f} MiB", flush=True)
    rows = []
    for s in shapes:
        phi = [t for res in runs[s] for t in res["phi"]]
        mp = [t for res in runs[s] for t in res["map"]]
        total = [a + b for res in runs[s] for a, b in zip(res["phi"], res["map"])]
        rows.append({"shape": s, "voxels": math.prod(s), "phi": statistics.median(phi), "map": statistics.median(mp),
                     "total": statistics.median(total), "peak": max(res["peak_mb"] for res in runs[s]),
                     "base": min(res["base_mb"] for res in runs[s])})
    ref = next((r for r in rows if r["voxels"] >= fit_from), rows[0])
    vox = [r["voxels"] for r in rows]
    tot = [r["total"] for r in rows]
    exp_big, exp_all = growth_exponent(vox, tot, fit_from), growth_exponent(vox, tot)
    grown = [(r["voxels"], r["peak"] - r["base"]) for r in rows if r["peak"] - r["base"] > 0]
    mexp_big = growth_exponent([v for v, _ in grown], [m for _, m in grown], fit_from)
    mexp_all = growth_exponent([v for v, _ in grown], [m for _, m in grown])
    lines = [f"| size | voxels | Φ = model(moving, fixed) (s) | Φ on the grid (s) | total (s) | ns/voxel | "
             f"voxels vs {shape_name(ref['shape'])} | time vs {shape_name(ref['shape'])} | peak RSS (MiB) | "
             "peak − RSS before the forward (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {shape_name(r['shape'])} | {r['voxels']:,} | {r['phi']:.3f} | {r['map']:.3f} | {r['total']:.3f} | "
                     f"{1e9 * r['total'] / r['voxels']:.0f} | {r['voxels'] / ref['voxels']:.2f} | "
                     f"{r['total'] / ref['total']:.2f} | {r['peak']:.0f} | {r['peak'] - r['base']:.0f} |")
    fit = (f"Growth exponent (least-squares slope of log time against log voxels): **{exp_big:.2f}** over sizes ≥ "
           f"{shape_name(parse_shape(opts.fit_from))}, {exp_all:.2f} over all sizes. Memory (peak minus RSS before "
           f"the forward): {mexp_big:.2f} over sizes ≥ {shape_name(parse_shape(opts.fit_from))}, {mexp_all:.2f} over all.")
    print("\n".join(lines) + "\n" + fit, flush=True)
    _plot_scaling(rows, exp_big, fit_from, opts.plot)
    print(f"  plot: {opts.plot}")
    model, _ = default_model(rows[0]["shape"])
    return (f"### Scaling with volume size\n\nOne pair of smooth random volumes through the default 3D model "
            f"(`configs/brain3d.toml`: three U-Net steps 16-32-64-64, two on images halved, {n_params(model):,} "
            f"parameters, untrained), evaluation mode under `torch.inference_mode()`. Time of Φ = `model(moving, fixed)` "
            f"and of Φ evaluated on the grid (`map_on_grid`); median of {opts.repeats} runs after a warm-up in each of "
            f"{opts.rounds} round(s), every size in a fresh subprocess, the sizes in turn within a round. Peak RSS is "
            f"the subprocess's own high-water mark (`VmHWM`; torch and the model included); the last column subtracts "
            f"its RSS just before the first forward (`VmRSS`). Plot: `{_rel(opts.plot)}`.\n\n" + "\n".join(lines) + "\n\n" + fit)


def _rel(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _plot_scaling(rows, exponent, fit_from, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vox = [r["voxels"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(vox, [r["total"] for r in rows], "o-", label="total")
    a.loglog(vox, [r["phi"] for r in rows], "s--", label="Φ = model(moving, fixed)")
    a.loglog(vox, [r["map"] for r in rows], "^--", label="Φ on the grid")
    big = [r for r in rows if r["voxels"] >= fit_from]
    if len(big) >= 2 and math.isfinite(exponent):
        v0, t0 = big[-1]["voxels"], big[-1]["total"]
        xs = [big[0]["voxels"], v0]
        a.loglog(xs, [t0 * (x / v0) ** exponent for x in xs], "k:", label=f"fit: voxels^{exponent:.2f}")
    a.set_xlabel("voxels")
    a.set_ylabel("seconds (median)")
    a.set_title("time per pair")
    a.legend(fontsize=8)
    b.loglog(vox, [r["peak"] for r in rows], "o-", label="peak RSS")
    grown = [r for r in rows if r["peak"] > r["base"]]
    b.loglog([r["voxels"] for r in grown], [r["peak"] - r["base"] for r in grown], "s--", label="peak − RSS before the forward")
    b.set_xlabel("voxels")
    b.set_ylabel("MiB")
    b.set_title("memory")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("cyclereg default 3D model (configs/brain3d.toml), one pair, CPU", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section_memory(opts) -> str:
    shape = parse_shape(opts.pair_size)
    print(f"\n[memory] {opts.pairs} pairs of {shape_name(shape)} with one loaded model, in a fresh process", flush=True)
    res = run_worker("memory", ["--shape", "x".join(map(str, shape)), "--pairs", str(opts.pairs)])
    s = rss_summary(res["rss"])
    sec = statistics.median(res["seconds"])
    text = (f"RSS after loading {res['after_load']:.0f} MiB; after pair 1 {s['first']:.0f} MiB, after pair "
            f"{opts.pairs} {s['last']:.0f} MiB, max {s['max']:.0f} MiB; slope over the last {s['tail']} pairs "
            f"**{s['slope']:+.3f} MiB per pair** ({s['slope'] * s['tail']:+.1f} MiB over them). Median "
            f"{sec:.3f} s per pair.")
    print(f"  via {res['how']}\n  {text}", flush=True)
    return (f"### Memory over {opts.pairs} pairs\n\nThe default 3D model written to a model file and loaded once "
            f"(`load_model`), then {opts.pairs} different pairs of {shape_name(shape)} smooth random volumes in the "
            f"same fresh process: {res['how']}, Φ on the grid and the warped moving image; RSS from "
            f"`/proc/self/statm` after each pair.\n\n{text}")


def section_flops(opts) -> str:
    from torch.utils.flop_counter import FlopCounterMode

    shape = parse_shape(opts.flop_size)
    model, _ = default_model(shape)
    moving, fixed = make_pair(shape)
    inputs = []
    hooks = [step.network.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone())) for step in model.steps]
    with torch.inference_mode():
        model(moving, fixed)
    for h in hooks:
        h.remove()
    nets = [step.network for step in model.steps]
    with torch.inference_mode():
        flops = []
        for net, x in zip(nets, inputs):
            with FlopCounterMode(display=False) as fc:
                net(x)
            flops.append(fc.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            map_on_grid(model(moving, fixed), shape, moving)
        flops_model = fc.get_total_flops()
    n = opts.mm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    print(f"\n[flops] default 3D model at {shape_name(shape)}: {sum(flops) / 1e9:.2f} GFLOP in its networks "
          f"({flops_model / 1e9:.2f} GFLOP counted in Φ on the grid); matmul {n}×{n}, {opts.flop_repeats} rounds", flush=True)

    def run_net(i):
        def f():
            with torch.inference_mode():
                nets[i](inputs[i])
        return f

    def run_model():
        with torch.inference_mode():
            map_on_grid(model(moving, fixed), shape, moving)

    fns = {f"net{i}": run_net(i) for i in range(len(nets))}
    fns["model"] = run_model
    fns["mm"] = lambda: torch.mm(a, b, out=c)
    times = alternate(fns, opts.flop_repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    mm_rate = 2 * n**3 / med["mm"]
    lines = ["| part | input | GFLOP | time (s) | GFLOP/s | fraction of matmul rate |", "|---|---|---|---|---|---|"]
    for i, (x, fl) in enumerate(zip(inputs, flops)):
        rate = fl / med[f"net{i}"]
        lines.append(f"| step {i} network ({model.steps[i].factor}× down) | {shape_name(tuple(x.shape[2:]))} | "
                     f"{fl / 1e9:.2f} | {med[f'net{i}']:.3f} | {rate / 1e9:.1f} | {rate / mm_rate:.3f} |")
    net_time = sum(med[f"net{i}"] for i in range(len(nets)))
    lines.append(f"| all networks | | {sum(flops) / 1e9:.2f} | {net_time:.3f} | {sum(flops) / net_time / 1e9:.1f} | "
                 f"{sum(flops) / net_time / mm_rate:.3f} |")
    lines.append(f"| whole Φ on the grid (networks, resampling, warps) | {shape_name(shape)} | {flops_model / 1e9:.2f} | "
                 f"{med['model']:.3f} | {flops_model / med['model'] / 1e9:.1f} | {flops_model / med['model'] / mm_rate:.3f} |")
    lines.append(f"| `torch.mm` {n}×{n} float32 | | {2 * n**3 / 1e9:.1f} | {med['mm']:.3f} | {mm_rate / 1e9:.1f} | 1 |")
    print("\n".join(lines), flush=True)
    return (f"### FLOP/s of the networks\n\nFLOPs counted by `torch.utils.flop_counter.FlopCounterMode` "
            f"(convolutions; 2 per multiply-add; interpolation and `grid_sample` are not counted) for one forward of each "
            f"network of the default 3D model on its input at {shape_name(shape)}, over its median time "
            f"({opts.flop_repeats} rounds after a warm-up, every part and the matmul alternating). The matmul rate is "
            f"this machine's float32 `torch.mm` of {n}×{n}.\n\n" + "\n".join(lines))


def _icon_recipe(shape):
    """icon_registration's 3D GradICON recipe (as in its ``pretrained_models/lung_ct.make_network``):
    tallUNet2 at 1/4, 1/2, full and full resolution, composed; GradICON with LNCC(σ=5), λ=1.5."""
    from icon_registration import losses, network_wrappers, networks

    inner = network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3))
    for _ in range(2):
        inner = network_wrappers.TwoStepRegistration(network_wrappers.DownsampleRegistration(inner, dimension=3),
                                                     network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3)))
    inner = network_wrappers.TwoStepRegistration(inner, network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3)))
    net = losses.GradientICONSparse(inner, similarity=losses.LNCC(sigma=5), lmbda=1.5)
    net.assign_identity_map([1, 1, *shape])
    return net.eval()


def _icon_single(shape):
    from icon_registration import losses, network_wrappers, networks

    net = losses.GradientICON(network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3)),
                              losses.LNCC(sigma=5), 1.5)
    net.assign_identity_map([1, 1, *shape])
    return net.eval()


def section_icon(opts) -> str:
    try:
        from importlib import import_module
        from importlib.metadata import version

        import_module("icon_registration")

        icon_version = version("icon_registration")
    except Exception as err:  # noqa: BLE001 - any import failure skips the section
        print(f"\n[icon] skipped: cannot import icon_registration ({type(err).__name__}: {err})")
        return ""
    shape = parse_shape(opts.icon_size)
    if min(shape) < 65:  # tallUNet2 pools 5 times at 1/4 resolution: 17 -> 9 -> 5 -> 3 -> 2 -> 1 at least
        print(f"\n[icon] skipped: --icon-size {shape_name(shape)} is too small for icon_registration's recipe "
              "(tallUNet2 at 1/4 resolution needs at least 65 voxels per axis)")
        return ""
    moving, fixed = make_pair(shape)
    torch.manual_seed(0)
    icon_recipe, icon_single = _icon_recipe(shape), _icon_single(shape)
    tall = n_params(icon_single.regis_net)
    widths = closest_unet_widths(tall)
    ours_default, _ = default_model(shape)
    ours_single = _as_loaded(build_model([{"network": "unet", "params": {"channels": widths}}], 3, shape).eval())
    ours_recipe = _as_loaded(build_model([{"network": "unet", "downsample": f, "params": {"channels": widths}}
                                          for f in (4, 2, 1, 1)], 3, shape).eval())

    def ours(model):
        def f():
            with torch.inference_mode():
                return map_on_grid(model(moving, fixed), shape, moving)
        return f

    def theirs(net):
        def f():
            with torch.inference_mode():
                return net.regis_net(moving, fixed)(net.identity_map)
        return f

    # Sanity: both are zero-initialised (untrained) so both maps must be the identity grid.
    ident = identity_grid(shape)
    err = max((ours(ours_recipe)() - ident).abs().max().item(), (theirs(icon_recipe)() - ident).abs().max().item())
    print(f"\n[icon] icon_registration {icon_version}, {shape_name(shape)}, {opts.icon_repeats} rounds after a warm-up; "
          f"untrained maps vs identity: max |Φ − Id| = {err:.1e}", flush=True)
    pairs = [
        ("whole models: cyclereg default (3 U-Net steps: ½, ½, full) vs icon_registration GradICON 3D recipe "
         "(4 tallUNet2: ¼, ½, full, full)", ours_default, icon_recipe),
        (f"same 4-step layout (¼, ½, full, full): cyclereg U-Net {'-'.join(map(str, widths))} per step vs tallUNet2",
         ours_recipe, icon_recipe),
        (f"one network at full resolution: cyclereg U-Net {'-'.join(map(str, widths))} vs tallUNet2", ours_single, icon_single),
    ]
    lines = ["| comparison | cyclereg params | icon_registration params | cyclereg (s) | icon_registration (s) | "
             "ratio cyclereg / icon |", "|---|---|---|---|---|---|"]
    for label, a, b in pairs:
        times = alternate({"ours": ours(a), "icon": theirs(b)}, opts.icon_repeats)
        ta, tb = statistics.median(times["ours"]), statistics.median(times["icon"])
        pa = n_params(a)
        pb = n_params(b.regis_net)
        lines.append(f"| {label} | {pa:,} | {pb:,} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} |")
        print("  " + lines[-1], flush=True)
    return (f"### 3D inference against icon_registration {icon_version}\n\nOne pair of {shape_name(shape)} smooth "
            f"random volumes, untrained weights, evaluation mode under `torch.inference_mode()`, one direction "
            f"(moving → fixed) and the map on the grid: cyclereg `map_on_grid(model(moving, fixed))`, icon_registration "
            f"`net.regis_net(moving, fixed)(net.identity_map)` (its `itk_wrapper.register_pair` runs the whole loss "
            f"forward instead, both directions, so it costs more). Median of {opts.icon_repeats} rounds after a warm-up, "
            f"the two alternating. tallUNet2 (3D) has {tall:,} parameters; the cyclereg U-Net widths "
            f"{widths} are the ones with the closest count (tallUNet2's encoder widths are 16-32-64-256-512). Both "
            f"untrained maps are the identity (max deviation {err:.1e}).\n\n" + "\n".join(lines))


def section_monai(opts) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import monai
            from monai.networks.blocks import Warp
            monai_warp = Warp(mode="bilinear", padding_mode="border")
    except Exception as err:  # noqa: BLE001 - any import failure skips the section
        print(f"\n[monai] skipped: cannot import monai ({type(err).__name__}: {err}); install it with "
              "`.venv-bench/bin/pip install -c constraints.txt monai` (then uninstall torchvision if it came along)")
        return ""
    shape = parse_shape(opts.warp_size)
    image = make_pair(shape)[0]
    disp = smooth_displacement(shape)  # cyclereg: domain units, component k along tensor axis k
    ddf = disp * voxel_scale(shape)  # MONAI: voxels, channels in spatial (tensor axis) order
    phi = DisplacementField(disp)
    points = identity_grid(shape) + disp
    with torch.inference_mode():
        ours = warp(image, phi)
        plain = sample(image, points)
        theirs = monai_warp(image, ddf)
    diff = (ours - theirs).abs().max().item()
    diff_plain = (plain - theirs).abs().max().item()
    moved = (ours - image).abs().max().item()
    tol = 1e-4
    agree = (f"max |cyclereg − MONAI| = {diff:.1e} (`warp`), {diff_plain:.1e} (`sample`) on an image in [0, 1] "
             f"(tolerance {tol:g}); the warp itself changes the image by up to {moved:.2f}, displacement up to "
             f"{ddf.abs().max():.1f} voxels")
    print(f"\n[monai] MONAI {monai.__version__}, {shape_name(shape)}: {agree}", flush=True)
    if not (diff < tol and diff_plain < tol and moved > 0.01):
        raise AssertionError(f"cyclereg and MONAI warps disagree: {agree}")

    def run(fn):
        def f():
            with torch.inference_mode():
                fn()
        return f

    fns = {"warp": run(lambda: warp(image, phi)), "sample": run(lambda: sample(image, points)),
           "monai": run(lambda: monai_warp(image, ddf))}
    times = alternate(fns, opts.warp_repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["| implementation | what it does | median (s) | ratio to MONAI |", "|---|---|---|---|",
             f"| `cyclereg.core.transforms.warp(image, DisplacementField(D))` | the map on the grid (D read at its own nodes), "
             f"then the image sampled (one grid_sample) | {med['warp']:.3f} | {med['warp'] / med['monai']:.2f} |",
             f"| `cyclereg.core.transforms.sample(image, Id + D)` | the map on the grid given: one grid_sample | "
             f"{med['sample']:.3f} | {med['sample'] / med['monai']:.2f} |",
             f"| `monai.networks.blocks.Warp` (bilinear, border) | reference grid + ddf, normalised, one grid_sample | "
             f"{med['monai']:.3f} | 1 |"]
    print("\n".join(lines), flush=True)
    return (f"### Warping against MONAI {monai.__version__}\n\nOne {shape_name(shape)} image and a smooth displacement "
            f"D (sinusoids, up to 3 voxels); MONAI gets it as `ddf = D · (n − 1)` per axis (voxels, channels in tensor "
            f"axis order). Agreement checked first: {agree}. Median of {opts.warp_repeats} rounds after a warm-up, "
            f"the three alternating, under `torch.inference_mode()`.\n\n" + "\n".join(lines))


def section_shell(opts) -> str:
    """`cyclereg register` from the shell on a 160×192×224 pair with the default 3D model (2 mm grid)."""
    from cyclereg.data.datasets import preprocessing
    from cyclereg.models.modelfile import save_model

    import SimpleITK as sitk

    brain = ROOT.parent / "shared" / "data" / "brain"
    shape = parse_shape(opts.shell_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(CONFIG, [f"data.root={brain}"])
        grid = tuple(-(-round(n / 2) // 16) * 16 for n in shape)  # the 2 mm model grid, padded to 16
        info = ModelInfo(cfg, grid, preprocessing(cfg.data))
        torch.manual_seed(0)
        save_model(tmp / "model.safetensors", build_from_info(info), info)
        for k, name in enumerate(("fixed", "moving")):
            image = sitk.GetImageFromArray(make_pair(shape, seed=k)[0][0, 0].numpy())
            sitk.WriteImage(image, str(tmp / f"{name}.nii.gz"))
        labels = sitk.GetImageFromArray((make_pair(shape, seed=5)[0][0, 0].numpy() * 8).astype("uint8"))
        sitk.WriteImage(labels, str(tmp / "labels.nii.gz"))
        cmd = [sys.executable, "-c", PEAK_WRAPPER, "register", "--model", str(tmp / "model.safetensors"),
               "--fixed", str(tmp / "fixed.nii.gz"), "--moving", str(tmp / "moving.nii.gz"),
               "--warped", str(tmp / "warped.nii.gz"), "--moving-labels", str(tmp / "labels.nii.gz"),
               "--warped-labels", str(tmp / "warped_labels.nii.gz"), "--transform", str(tmp / "transform.nii.gz"),
               "--device", "cpu"]
        seconds, peaks = [], []
        for _ in range(opts.shell_repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise RuntimeError(f"cyclereg register failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            kib = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB ")]
            peaks.append(kib[-1] / 2**20 if kib else math.nan)  # the process's own VmHWM, in GiB
    text = (f"`cyclereg register` on a {shape_name(shape)} pair of NIfTI files (1 mm) with the default 3D model "
            f"(configs/brain3d.toml: 2 mm grid {'x'.join(map(str, grid))}, three U-Net steps; untrained weights, which "
            f"cost the same): warped image, warped labels and displacement field written; a fresh process each time, "
            f"imports included; peak memory is the process's own peak RSS (VmHWM). Median of {opts.shell_repeats}: **{statistics.median(seconds):.2f} s** wall "
            f"(all: {', '.join(f'{t:.2f}' for t in seconds)}), peak memory {max(peaks):.2f} GiB.")
    print(f"\n[shell] {text}", flush=True)
    return "### Registering one pair from the shell\n\n" + text


SECTIONS = {"shell": section_shell, "scaling": section_scaling, "memory": section_memory, "flops": section_flops, "icon": section_icon,
            "monai": section_monai}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Defaults (full / --quick): " + json.dumps(FULL) + " / " + json.dumps(QUICK))
    for name in SECTIONS:
        p.add_argument(f"--{name}", action="store_true", help=f"run the {name} section (default: all sections)")
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes, few repeats, fewer pairs")
    p.add_argument("--append", action="store_true", help="append the report to BENCHMARKS.md")
    p.add_argument("--sizes", nargs="+", help="scaling: sizes, e.g. 32 64 160x192x224 (tensor order)")
    p.add_argument("--repeats", type=int, help="scaling: timed runs per size and round")
    p.add_argument("--rounds", type=int, help="scaling: rounds over all sizes")
    p.add_argument("--fit-from", help="scaling: fit the exponent over sizes with at least this many voxels (a size)")
    p.add_argument("--pairs", type=int, help="memory: number of pairs")
    p.add_argument("--pair-size", help="memory: pair size")
    p.add_argument("--flop-size", help="flops: input size")
    p.add_argument("--mm-size", type=int, help="flops: matmul size n (n×n)")
    p.add_argument("--flop-repeats", type=int)
    p.add_argument("--icon-size", help="icon: input size")
    p.add_argument("--icon-repeats", type=int)
    p.add_argument("--warp-size", help="monai: image size")
    p.add_argument("--warp-repeats", type=int)
    p.add_argument("--plot", help="scaling: where the log-log plot goes")
    p.add_argument("--shell-size", help="shell: image size (tensor order)")
    p.add_argument("--shell-repeats", type=int)
    p.add_argument("--threads", type=int, help="torch threads here and in every subprocess (default: torch's own); "
                   "on a shared machine, fewer threads than busy cores avoids OpenMP oversubscription")
    p.add_argument("--worker", choices=["scaling", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # for the subprocesses
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.worker:
        shape = parse_shape(args.shape)
        res = scaling_worker(shape, args.repeats, 1) if args.worker == "scaling" else memory_worker(shape, args.pairs)
        print(json.dumps(res))
        return

    chosen = [name for name in SECTIONS if getattr(args, name)] or list(SECTIONS)
    print(f"{machine()}\nsections: {', '.join(chosen)}{' (quick)' if args.quick else ''}", flush=True)
    t0 = time.perf_counter()
    bodies = [body for body in (SECTIONS[name](args) for name in chosen) if body]
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    if args.append and bodies:
        append_report("Inference: register from the shell, scaling, memory over pairs, FLOP/s, icon_registration, MONAI (benchmarks/inference.py)",
                      ("Quick settings (`--quick`). " if args.quick else "") + f"Sections: {', '.join(chosen)}.\n\n"
                      + "\n\n".join(bodies))


if __name__ == "__main__":
    main()
