"""Checks of the pure logic of benchmarks/inference.py: the growth-exponent fit, the RSS summary,
the alternation of timed calls, sizes, peak memory, and the displacement conversion to MONAI's
convention. Not part of the main suite (that lives in tests/):

    .venv-bench/bin/python -m pytest benchmarks/test_inference.py
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inference as bench  # noqa: E402

from cyclereg.core.coords import identity_grid, voxel_scale  # noqa: E402
from cyclereg.core.transforms import DisplacementField, sample, warp  # noqa: E402


def test_parse_shape():
    assert bench.parse_shape("64") == (64, 64, 64)
    assert bench.parse_shape("80x96x112") == (80, 96, 112)
    assert bench.parse_shape("80×96×112") == (80, 96, 112)
    for bad in ("64x64", "1", "a", "8x8x8x8"):
        with pytest.raises(ValueError):
            bench.parse_shape(bad)
    assert bench.shape_name((64, 64, 64)) == "64³"
    assert bench.shape_name((80, 96, 112)) == "80×96×112"


def test_loglog_slope_recovers_a_power_law():
    voxels = [32**3, 64**3, 128**3, 160 * 192 * 224]
    assert bench.loglog_slope(voxels, [3e-7 * v**1.3 for v in voxels]) == pytest.approx(1.3)
    assert bench.loglog_slope(voxels, [5.0] * 4) == pytest.approx(0.0)


def test_growth_exponent_threshold_drops_the_small_sizes():
    voxels = [32**3, 48**3, 64**3, 96**3, 128**3]
    times = [0.5 + 1e-8 * v if v < 64**3 else 2e-8 * v for v in voxels]  # fixed overhead at small sizes
    assert bench.growth_exponent(voxels, times, 64**3) == pytest.approx(1.0)
    assert bench.growth_exponent(voxels, times) < 0.9
    assert math.isnan(bench.growth_exponent(voxels, times, 128**3))  # one point: no fit


def test_linear_slope():
    assert bench.linear_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert bench.linear_slope([0, 1, 2, 3], [1, 2, 1, 2]) == pytest.approx(0.2)
    assert math.isnan(bench.linear_slope([1, 1], [0, 5]))


def test_rss_summary_fits_the_last_80_percent():
    rss = [500.0 + 100 * (k == 0) for k in range(20)] + [500.0 + 0.5 * k for k in range(80)]
    s = bench.rss_summary(rss)
    assert (s["first"], s["last"], s["max"], s["tail"]) == (600.0, 539.5, 600.0, 80)
    assert s["slope"] == pytest.approx(0.5)
    assert bench.rss_summary([400.0, 401.0])["slope"] == pytest.approx(1.0)  # short series: all of it


def test_alternate_rotates_and_skips_the_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.alternate(fns, repeats=3, warmup=1)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_closest_unet_widths():
    with torch.device("meta"):
        target = bench.n_params(bench.UNet(3, None, [16, 32, 64, 256, 512]))
    assert bench.closest_unet_widths(target) == [16, 32, 64, 256, 512]
    assert bench.closest_unet_widths(target - 1000) == [16, 32, 64, 256, 512]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_is_this_process_own_and_counts_an_allocation():
    before = bench.peak_rss_mb()
    assert 0 < bench.current_rss_mb() <= before
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert bench.peak_rss_mb() >= bench.current_rss_mb() >= 60
    del x


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_wrapper_runs_the_cli_and_reports_its_peak():
    proc = subprocess.run([sys.executable, "-c", bench.PEAK_WRAPPER, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "register" in proc.stdout
    kib = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB ")]
    assert len(kib) == 1 and kib[0] > 10_000


def _warp_voxel_units(image, ddf):
    """MONAI's convention written out: ddf in voxels, channels in tensor axis order, align_corners."""
    shape = image.shape[2:]
    ref = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=image.dtype) for n in shape], indexing="ij"))[None]
    grid = ref + ddf
    grid = torch.stack([grid[:, k] * 2 / (n - 1) - 1 for k, n in enumerate(shape)], -1).flip(-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def test_displacement_in_voxels_matches_cyclereg_warp():
    shape = (9, 10, 11)  # three different sizes: axes cannot be confused
    image = bench.smooth_volume(shape, torch.Generator().manual_seed(0))
    disp = bench.smooth_displacement(shape, voxels=2.0)
    ddf = disp * voxel_scale(shape)
    assert ddf.abs().amax().item() == pytest.approx(2.0, rel=0.05)
    ours = warp(image, DisplacementField(disp))
    assert torch.allclose(ours, sample(image, identity_grid(shape) + disp), atol=1e-6)
    assert torch.allclose(ours, _warp_voxel_units(image, ddf), atol=1e-5)
    assert (ours - image).abs().max() > 1e-2  # not trivially the identity
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.networks.blocks import Warp

            monai_warp = Warp(mode="bilinear", padding_mode="border")
    except Exception:  # noqa: BLE001 - MONAI is optional (only in .venv-bench)
        return
    assert torch.allclose(ours, monai_warp(image, ddf), atol=1e-5)
