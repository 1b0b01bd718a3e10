"""CycleMorph's multi-scale scheme: global step on the whole image, local step on patches."""

import torch

from cyclereg.methods import build_model
from cyclereg.metrics import count_folds
from cyclereg.multiscale import blend_weight, multiscale_register, patch_starts
from cyclereg.transforms import map_on_grid

from conftest import smooth_image


def _model(dim, shape, std=0.02):
    model = build_model([{"network": "unet", "downsample": 2, "params": {"channels": [8, 16]}},
                         {"network": "unet", "params": {"channels": [8, 16]}}], dim, shape).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, std)
    return model


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
    model = _model(dim, shape)
    a, b = smooth_image(shape, 1, 1), smooth_image(shape, 1, 2)
    with torch.no_grad():
        whole = map_on_grid(model(a, b), shape, a)
        patched = map_on_grid(multiscale_register(model, a, b, patch=shape, overlap=(0,) * dim), shape, a)
    assert torch.allclose(whole, patched, atol=1e-6)


def test_blended_patches_have_no_seams():
    """A smooth local step (here: constant per patch input) blends into a field whose folds and
    jumps at patch borders are no worse than inside."""
    shape = (48, 48)
    model = _model(2, shape, std=0.01)
    a, b = smooth_image(shape, 1, 1), smooth_image(shape, 1, 2)
    with torch.no_grad():
        field = map_on_grid(multiscale_register(model, a, b, patch=(24, 24), overlap=(8, 8)), shape, a)
    assert int(count_folds(field)) == 0
    # Second differences across rows, away from the image border (where the network itself is less
    # smooth): the patch borders (rows 12, 24, 36) show no spike.
    d2 = (field[:, :, 2:] - 2 * field[:, :, 1:-1] + field[:, :, :-2]).abs().amax(dim=(0, 1, 3))[3:-3]
    assert float(d2.max()) < 5 * float(d2.median()) + 1e-6
