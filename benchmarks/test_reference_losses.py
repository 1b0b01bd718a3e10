"""cyclereg's losses against the authors' installed packages, on the same maps, sample points and images.

Not part of the main suite (the packages are not cyclereg dependencies). Install them as
``benchmarks/requirements-reference.txt`` says (icon_registration; voxelmorph 0.2 with ``--no-deps``),
then:

    .venv-bench/bin/python -m pytest benchmarks/test_reference_losses.py

* ICON and GradICON: icon_registration's ``InverseConsistentNet`` and ``GradientICON`` run their whole
  loss (``all_loss``, the consistency term and the similarity) on a stand-in network that returns
  fixed displacement fields, against cyclereg's ``loss_terms`` on a stand-in model with the same
  fields. The authors draw their off-grid points with the global generator; cyclereg's
  ``random_points`` is replaced by the same draw. Similarities: their ``ssd`` and ``LNCC(sigma)``.
* VoxelMorph: ``voxelmorph.torch.losses.NCC`` (the window NCC that CycleMorph's ``crossCorrelation3D``
  also computes) and ``Grad('l2')``. Only ``losses.py`` is loaded from the installed package: the
  package's ``__init__`` needs neurite, and 0.2's ``modelio`` fails to import on Python 3.11. Its NCC
  puts its window on ``"cuda"``; without a GPU the test maps that device to the CPU.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

icon = pytest.importorskip("icon_registration")

from cyclereg.models import methods  # noqa: E402
from cyclereg.core.coords import identity_grid  # noqa: E402
from cyclereg.losses import diffusion, lncc_box  # noqa: E402
from cyclereg.models.methods import LossSettings, loss_terms
from cyclereg.core.transforms import DisplacementField  # noqa: E402

SHAPES = {2: (20, 17), 3: (12, 11, 10)}
RTOL = 1e-4


def _smooth(shape, n, seed, amplitude):
    """``(n, d, *shape)`` smooth random displacements of about ``amplitude`` voxels, in domain units."""
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    coarse = torch.randn(n, d, *([4] * d), generator=g)
    field = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear" if d == 2 else "trilinear",
                                            align_corners=True)
    scale = torch.tensor([s - 1 for s in shape], dtype=torch.float32).view(1, d, *([1] * d))
    return amplitude * field / scale


def _images(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = identity_grid(shape)
    out = 0
    for _ in range(3):
        freq = torch.randn(n, len(shape), generator=g).view(n, len(shape), *([1] * len(shape))) * 3
        out = out + torch.sin((freq * x).sum(1, keepdim=True) * math.pi + torch.rand(1, generator=g).item() * 6)
    return (out - out.min()) / (out.max() - out.min())


class _Fields(torch.nn.Module):
    """Stand-in network: ``Φ_AB`` for (A, B), ``Φ_BA`` for (B, A), in either library's form."""

    def __init__(self, a, b, ab, ba, wrap):
        super().__init__()
        self.a, self.b, self.ab, self.ba, self.wrap = a, b, ab, ba, wrap

    def pick(self, moving):
        if torch.equal(moving, self.a):
            return self.ab
        if torch.equal(moving, self.b):
            return self.ba
        if torch.equal(moving, torch.cat([self.a, self.b])):  # cyclereg runs both directions as one batch
            return torch.cat([self.ab, self.ba])
        raise AssertionError("the stand-in network was called on images it does not know")

    def forward(self, moving, fixed):
        return self.wrap(self.pick(moving))


def _reference(kind, similarity, lam, a, b, ab, ba):
    from icon_registration.network_wrappers import FunctionFromVectorField

    class Net(torch.nn.Module):
        def forward(self, moving, fixed):
            return _Fields(a, b, ab, ba, lambda f: f).pick(moving)

    wrapper = icon.InverseConsistentNet if kind == "icon" else icon.GradientICON
    model = wrapper(FunctionFromVectorField(Net()), similarity, lam)
    model.assign_identity_map(a.shape)
    return model


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind,lam", [("icon", 2048.0), ("gradicon", 1.5)])
@pytest.mark.parametrize("sim", ["mse", "lncc"])
def test_icon_and_gradicon_losses_equal_the_authors(dim, kind, lam, sim, monkeypatch):
    shape = SHAPES[dim]
    a, b = _images(shape, 2, seed=1), _images(shape, 2, seed=2)
    ab, ba = _smooth(shape, 2, seed=3, amplitude=1.5), _smooth(shape, 2, seed=4, amplitude=1.5)
    reference_sim = icon.ssd if sim == "mse" else icon.LNCC(sigma=2)
    reference = _reference(kind, reference_sim, lam, a, b, ab, ba)

    torch.manual_seed(7)
    theirs = reference(a, b)
    torch.manual_seed(7)  # the authors' draw: identity + N(0, 1) / shape[-1], one set for the whole batch
    points = identity_grid(shape) + torch.randn(1, dim, *shape) / shape[-1]
    monkeypatch.setattr(methods, "random_points", lambda n, *args, **kwargs: points.expand(n, *points.shape[1:]))
    ours_model = _Fields(a, b, ab, ba, DisplacementField)
    total, terms = loss_terms(ours_model, a, b, LossSettings(kind, sim, lam, sigma=2.0))

    torch.testing.assert_close(terms["sim"], theirs.similarity_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(terms[kind], theirs.inverse_consistency_loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(total, theirs.all_loss, rtol=RTOL, atol=0)


def _voxelmorph_losses():
    spec = importlib.util.find_spec("voxelmorph")
    if spec is None:
        pytest.skip("voxelmorph is not installed (benchmarks/requirements-reference.txt)")
    path = next(iter(spec.submodule_search_locations)) + "/torch/losses.py"
    module_spec = importlib.util.spec_from_file_location("voxelmorph_torch_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """VoxelMorph 0.2's NCC moves its window to "cuda"; map that to the CPU when there is no GPU."""
    if torch.cuda.is_available():
        return
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: to(
        self, *["cpu" if x == "cuda" else x for x in args], **kwargs))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("background", [0.0, -1.0])
def test_box_lncc_equals_voxelmorphs_ncc(dim, background, cuda_on_cpu):
    vxm = _voxelmorph_losses()
    shape = SHAPES[dim]
    fixed = _images(shape, 2, seed=5) + background
    moving = DisplacementField(_smooth(shape, 2, seed=6, amplitude=2.0))
    warped = methods.warp(fixed, moving)
    theirs = vxm.NCC(win=[9] * dim).loss(fixed, warped)  # -mean(cc²)
    ours = lncc_box(warped, fixed, 9).mean()  # 1 - mean(cc²)
    torch.testing.assert_close(ours - 1, theirs.float(), rtol=RTOL, atol=0)


def test_diffusion_equals_voxelmorphs_grad_l2():
    dim = 3  # VoxelMorph 0.2's torch Grad is written for 3D fields only
    vxm = _voxelmorph_losses()
    shape = SHAPES[dim]
    field = _smooth(shape, 2, seed=8, amplitude=2.0)
    in_voxels = field * torch.tensor([s - 1 for s in shape], dtype=torch.float32).view(1, dim, *([1] * dim))
    theirs = vxm.Grad("l2").loss(None, in_voxels)
    torch.testing.assert_close(diffusion(field).mean(), theirs, rtol=RTOL, atol=0)
