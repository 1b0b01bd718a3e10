"""CycleMorph's multi-scale scheme: global step on the whole image, local step on patches."""

import math

import torch

from cyclereg.models.registration import split_steps
from cyclereg.core.metrics import count_folds
from cyclereg.models.multiscale import blend_weight, multiscale_register, patch_starts, random_patches
from cyclereg.core.transforms import map_on_grid

from conftest import random_two_step_model, smooth_image


def test_patch_starts_cover_the_axis_with_overlap():
    for n, p, o in [(100, 32, 8), (33, 16, 4), (10, 16, 4), (64, 64, 0)]:
        starts = patch_starts(n, p, o)
        covered = set()
        for s in starts:
            covered.update(range(s, min(s + p, n)))
        assert covered == set(range(n))
        assert starts[0] == 0 and (starts[-1] + p >= n)
        assert all(b - a <= p - o for a, b in zip(starts, starts[1:]))


def test_blend_weight_is_positive_and_peaks_in_the_middle():
    w = blend_weight((9, 10))
    assert float(w.min()) > 0 and float(w.max()) <= 1
    assert float(w[0, 0, 4, 5]) > float(w[0, 0, 0, 0])


def test_one_patch_covering_the_image_equals_the_single_scale_model(dim):
    shape = (16, 14) if dim == 2 else (12, 10, 8)
    model = random_two_step_model(dim, shape)
    a, b = smooth_image(shape, 1, 1), smooth_image(shape, 1, 2)
    with torch.no_grad():
        whole = map_on_grid(model(a, b), shape, a)
        patched = map_on_grid(multiscale_register(model, a, b, patch=shape, overlap=(0,) * dim), shape, a)
    assert torch.allclose(whole, patched, atol=1e-6)


def test_blended_patches_have_no_seams():
    """A smooth local step (here: constant per patch input) blends into a field whose folds and
    jumps at patch borders are no worse than inside."""
    shape = (48, 48)
    model = random_two_step_model(2, shape, std=0.01)
    a, b = smooth_image(shape, 1, 1), smooth_image(shape, 1, 2)
    with torch.no_grad():
        field = map_on_grid(multiscale_register(model, a, b, patch=(24, 24), overlap=(8, 8)), shape, a)
    assert int(count_folds(field)) == 0
    # Second differences across rows, away from the image border (where the network itself is less
    # smooth): the patch borders (rows 12, 24, 36) show no spike.
    d2 = (field[:, :, 2:] - 2 * field[:, :, 1:-1] + field[:, :, :-2]).abs().amax(dim=(0, 1, 3))[3:-3]
    assert float(d2.max()) < 5 * float(d2.median()) + 1e-6


def test_random_patches_cut_the_same_place_of_both_images(dim):
    shape = (16, 12) if dim == 2 else (10, 9, 8)
    patch = (8, 5) if dim == 2 else (4, 5, 6)
    fixed = torch.arange(2 * math.prod(shape), dtype=torch.float32).view(2, 1, *shape)  # every voxel its own value
    moving = fixed + 10_000
    global_model, _ = split_steps(random_two_step_model(dim, shape, std=0.0), 1)  # zero output: the identity map
    torch.manual_seed(0)
    m, f = random_patches(global_model, moving, fixed, patch)
    assert m.shape == f.shape == (2, 1) + patch
    assert torch.allclose(m - f, torch.full_like(f, 10_000.0))
    for i in range(2):  # each patch is a block of its own image: find its corner from the first value
        corner = torch.nonzero(fixed[i, 0] == f[i, 0].flatten()[0])[0].tolist()
        block = fixed[i, 0][tuple(slice(c, c + p) for c, p in zip(corner, patch))]
        assert torch.equal(block, f[i, 0])
    torch.manual_seed(0)
    assert torch.equal(random_patches(global_model, moving, fixed, patch)[1], f)  # drawn from torch's generator


def test_local_step_trains_on_patches_with_the_global_step_frozen(tmp_path):
    """A stage with ``patch`` trains the last step on patches; the global step keeps the weights it
    had at the end of the first stage (those of a run that stops there)."""
    from cyclereg.core.config import config_from_dict
    from cyclereg.models.modelfile import load_model
    from cyclereg.training.train import train

    from conftest import tiny_config_dict

    for method in ("icon", "cyclemorph"):
        raw = tiny_config_dict(model__method=method)
        raw["model"]["steps"] = [{"network": "unet", "downsample": 2, "params": {"channels": [4, 8]}},
                                 {"network": "unet", "params": {"channels": [4, 8]}}]
        raw["train"].update(steps=6, stages=[{"fraction": 0.5, "train": [0]}, {"fraction": 0.5, "train": [1], "patch": [8, 8]}])
        two_stages, _ = load_model(train(config_from_dict(raw), tmp_path / f"{method}_both", progress=False, device="cpu"))
        raw["train"].update(steps=3, stages=[{"fraction": 1.0, "train": [0]}])
        first_stage, _ = load_model(train(config_from_dict(raw), tmp_path / f"{method}_first", progress=False, device="cpu"))
        g_two, g_first = (getattr(m, "g_ab", m) for m in (two_stages, first_stage))
        assert all(torch.equal(a, b) for a, b in zip(g_two.steps[0].state_dict().values(), g_first.steps[0].state_dict().values()))
        out = g_two.steps[1].network.out.weight  # zero before training (the identity map)
        assert float(out.detach().abs().max()) > 0, method
