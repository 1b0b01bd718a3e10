"""ICON / GradICON reference models for the benchmarks, built with the authors'
package ``icon_registration`` (PyPI; tested with 1.1.9).

Nothing from cyclereg is imported here, and none of icon_registration's code is
copied: we only call it. To install, see ``benchmarks/requirements-reference.txt``
(use ``-c constraints.txt``, then ``pip uninstall -y torchvision``).

API used from icon_registration
-------------------------------
* ``icon_registration.networks.tallUNet2(dimension=2)``: a 5-level U-Net that maps
  ``cat([A, B], 1)`` to a displacement field (N, 2, H, W). Its last conv is
  zero-initialised, so a fresh model is the identity map.
* ``icon_registration.FunctionFromVectorField(net)``: wraps the network so that
  ``regis_net(A, B)`` returns a Python function ``phi_AB(coords) = coords +
  interp(displacement, coords)``.
* ``icon_registration.InverseConsistentNet(regis_net, similarity, lmbda)`` (ICON)
  and ``icon_registration.GradientICON(...)`` (GradICON). Calling
  ``forward(image_A, image_B)`` returns the namedtuple ``ICONLoss(all_loss,
  inverse_consistency_loss, similarity_loss, transform_magnitude, flips)``, where
  ``all_loss = lmbda * inverse_consistency_loss + sim(A∘phi_AB, B) + sim(B∘phi_BA, A)``.
  It also stores ``phi_AB_vectorfield`` and ``warped_image_A`` on the module.
  image_A is the MOVING image and image_B is the FIXED one.
* ``model.assign_identity_map(shape)``: must be called before use. It stores the
  (1, 2, H, W) ``identity_map`` buffer. Its batch size is forced to 1, so any
  batch size works afterwards.
* ``icon_registration.ssd``: mean squared error. ``icon_registration.losses.to_floats``
  turns an ICONLoss into Python floats.
* One training step in icon_registration's own loops (``train_datasets``,
  ``train_batchfunction``) is: ``zero_grad``, ``loss = net(A, B)``,
  ``loss.all_loss.backward()``, ``optimizer.step()``. ``train_step`` below does
  the same thing without footsteps, tensorboard or data loaders. Their 2D examples
  use ``torch.optim.Adam(lr=1e-3)``: the triangles example uses ICON with MSE,
  lmbda=2048 and batch 128; the MNIST tutorial uses GradICON with LNCC(sigma=4)
  and lmbda=0.5.

Map convention (checked against the source and by ``check_convention``)
-----------------------------------------------------------------------
icon_registration's maps are tensors (N, d, *spatial) of points in [0, 1]^d.
``identity_map[:, k]`` equals ``index_k * spacing_k`` with
``spacing_k = 1 / (n_k - 1)``, so pixel i is at i/(n-1) (align-corners style), and
component k is the coordinate along tensor spatial axis k (component 0 is the
row/H axis). Warping (mermaidlite.compute_warped_image_multiNC) rescales to
[-1, 1], reverses the component order for ``grid_sample`` and calls it with
``align_corners=True, padding_mode="border"``, bilinear. This is exactly OUR
convention, so ``predict_map`` returns ICON's ``phi_AB(identity_map)`` without
any change. ``check_convention()`` shows this numerically on a non-square image
(12x9, so the two axes cannot be confused). It sets the U-Net to a constant
displacement of one row, (1/(H-1), 0). Then (a) the identity map is
(i/(H-1), j/(W-1)); (b) ICON's own ``warped_image_A`` equals the moving image
shifted up by one row (fixed[i, j] = moving[i+1, j]), while a displacement along
component 1 does not; (c) warping the moving image with ``predict_map``'s output
under OUR convention (grid_sample, align_corners=True, border) gives the same
image as ICON's warped image.
We also checked by training (this check is not part of the module): ICON with
lam=1, MSE, 300 steps at batch 16 on pairs with fixed[i, j] = moving[i+2, j].
The predicted displacement came out as +2.1 px on component 0 and 0.07 px on
component 1 (eval mode), and as +1.85 px and 0.00 px in train mode.

Pitfalls
--------
* tallUNet2 contains BatchNorm. ``train_step`` calls ``model.train()``.
  ``predict_map`` switches to ``eval()`` by default (running statistics), as
  icon_registration's own inference code does, and restores the previous mode
  afterwards. Pass ``eval_mode=False`` to use batch statistics instead.
* The inverse-consistency terms use a random off-grid point set
  (identity + N(0, 1/W) noise) drawn with the global torch RNG. Seed it with
  ``torch.manual_seed`` if you need reproducible steps.
* lmbda=2048 (the triangles example, whose images are in [-1, 1]) with MSE on
  our [0, 1] smooth blobs learned nothing in 250 steps: the displacement stayed
  near 0. lmbda=1 learned the shift. Tune lmbda for our data and intensity range.
* After short training, BatchNorm running statistics lag behind. In the shift
  test above, eval mode gave a warped-vs-fixed MSE of 6e-4, against 1e-4 in
  train mode.
* ``import icon_registration.data`` (and ``.constricon``) needs torchvision, so
  do not import them.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import icon_registration as icon
from icon_registration import networks
from icon_registration.losses import to_floats

__all__ = [
    "make_icon_model",
    "train_step",
    "predict_map",
    "check_convention",
    "EXAMPLE_LR",
    "EXAMPLE_LAMBDA",
]

#: Adam learning rate used in icon_registration's 2D examples (triangles, MNIST).
EXAMPLE_LR = 1e-3
#: lmbda from the examples: ICON+MSE on triangles (2048); GradICON+LNCC on MNIST (0.5).
EXAMPLE_LAMBDA = {"icon": 2048.0, "gradicon": 0.5}


def _similarity(name):
    name = name.lower()
    if name in ("mse", "ssd"):
        return icon.ssd  # mean((A - B)**2)
    if name == "lncc":
        return icon.LNCC(sigma=4)
    if name == "ncc":
        return icon.NCC()
    raise ValueError(f"unknown similarity {name!r} (use 'mse', 'lncc' or 'ncc')")


def make_icon_model(kind: str, lam: float, shape: tuple[int, ...], similarity="mse") -> torch.nn.Module:
    """Build ICON ('icon') or GradICON ('gradicon') with a 2D tallUNet2.

    ``shape`` is either the spatial shape (H, W) or a full shape (N, C, H, W).
    The identity map is assigned for it. The model is returned in train mode on
    the CPU; move it with ``.to(device)`` if needed.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        full = (1, 1) + shape
    elif len(shape) == 4:
        full = shape
    else:
        raise ValueError(f"2D only: shape must be (H, W) or (N, C, H, W), got {shape}")
    cls = {"icon": icon.InverseConsistentNet, "gradicon": icon.GradientICON}.get(kind.lower())
    if cls is None:
        raise ValueError(f"kind must be 'icon' or 'gradicon', got {kind!r}")
    regis_net = icon.FunctionFromVectorField(networks.tallUNet2(dimension=2, input_channels=full[1]))
    model = cls(regis_net, _similarity(similarity), float(lam))
    model.assign_identity_map(full)
    model.train()
    return model


def train_step(model, optimizer, moving, fixed) -> dict[str, float]:
    """One optimisation step on a batch with icon_registration's own loss.

    ``moving`` and ``fixed`` are float32 tensors of shape (N, 1, H, W), on the
    model's device. Returns ICON's loss terms as floats: all_loss,
    inverse_consistency_loss, similarity_loss, transform_magnitude and flips
    (the average number of folded cells in phi_BA per image). The ``.item()``
    calls synchronise, so timing the call with a wall clock is accurate.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(moving, fixed)
    loss.all_loss.backward()
    optimizer.step()
    return {k: float(v) for k, v in to_floats(loss)._asdict().items()}


def predict_map(model, moving, fixed, eval_mode: bool = True) -> torch.Tensor:
    """Return Phi_AB (N, 2, H, W), with moving∘Phi ≈ fixed, in OUR convention.

    Points are in [0, 1] per axis, pixel i is at i/(n-1), and component 0 is the
    row (H) axis. This is icon_registration's own convention (see the module
    docstring), so no conversion is needed. Runs under ``torch.no_grad``.
    """
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            phi_AB = model.regis_net(moving, fixed)  # python function on coordinates
            phi = phi_AB(model.identity_map)  # (1 or N, 2, H, W)
            phi = phi.expand(moving.shape[0], *phi.shape[1:])
    finally:
        model.train(was_training)
    return phi.float().contiguous()


# ----------------------------------------------------------------------------
# verification and smoke test
# ----------------------------------------------------------------------------


def _warp_ours(image, phi):
    """Warp image (N,C,H,W) by map phi (N,2,H,W) in our convention."""
    grid = (2.0 * phi - 1.0).flip(1).permute(0, 2, 3, 1)  # grid_sample wants (x=W, y=H)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _set_constant_displacement(model, d0, d1):
    unet = model.regis_net.net
    with torch.no_grad():
        unet.lastConv.weight.zero_()
        # tallUNet2 returns lastConv(x) / 10
        unet.lastConv.bias.copy_(torch.tensor([10.0 * d0, 10.0 * d1]))


def check_convention(H: int = 12, W: int = 9, seed: int = 0) -> dict[str, float]:
    """Check numerically that ICON's maps follow our convention (raises if not)."""
    g = torch.Generator().manual_seed(seed)
    moving = _smooth_blobs(2, H, W, g)
    # fixed[i, j] = moving[i+1, j] (last row repeated, like border padding)
    fixed = torch.cat([moving[:, :, 1:], moving[:, :, -1:]], dim=2)
    out = {}
    model = make_icon_model("icon", 1.0, (H, W))
    model.eval()

    ii = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W) / (H - 1)
    jj = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W) / (W - 1)
    ident = model.identity_map[0]
    out["identity_err"] = max((ident[0] - ii).abs().max().item(), (ident[1] - jj).abs().max().item())

    _set_constant_displacement(model, 1.0 / (H - 1), 0.0)
    with torch.no_grad():
        model(moving, fixed)
    out["icon_warp_row_shift_err"] = (model.warped_image_A - fixed).abs().max().item()
    phi = predict_map(model, moving, fixed)
    out["map_err"] = max(
        (phi[:, 0] - (ii + 1.0 / (H - 1))).abs().max().item(), (phi[:, 1] - jj).abs().max().item()
    )
    out["our_warp_vs_icon_warp_err"] = (_warp_ours(moving, phi) - model.warped_image_A).abs().max().item()
    out["our_warp_vs_fixed_err"] = (_warp_ours(moving, phi) - fixed).abs().max().item()

    # negative control: a one-pixel shift along component 1 must NOT reproduce fixed
    _set_constant_displacement(model, 0.0, 1.0 / (W - 1))
    with torch.no_grad():
        model(moving, fixed)
    out["control_col_shift_err"] = (model.warped_image_A - fixed).abs().max().item()

    tol = 1e-5
    ok = (
        out["identity_err"] < tol
        and out["icon_warp_row_shift_err"] < tol
        and out["map_err"] < tol
        and out["our_warp_vs_icon_warp_err"] < tol
        and out["our_warp_vs_fixed_err"] < tol
        and out["control_col_shift_err"] > 1e-2
    )
    if not ok:
        raise AssertionError(f"icon_registration map convention differs from ours: {out}")
    return out


def _smooth_blobs(n, H, W, generator=None, blobs=3):
    """Random smooth images in [0, 1]: sums of Gaussian blobs, shape (n, 1, H, W)."""
    ii = torch.arange(H, dtype=torch.float32)[:, None] / (H - 1)
    jj = torch.arange(W, dtype=torch.float32)[None, :] / (W - 1)
    img = torch.zeros(n, 1, H, W)
    for _ in range(blobs):
        c = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        s = 0.08 + 0.12 * torch.rand(n, generator=generator)
        r2 = (ii - c[:, 0, None, None]) ** 2 + (jj - c[:, 1, None, None]) ** 2
        img[:, 0] += torch.exp(-r2 / (2 * s[:, None, None] ** 2))
    return img / img.amax(dim=(2, 3), keepdim=True)


def _time_steps(kind, batch, H=28, W=28, warmup=3, steps=10, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make_icon_model(kind, EXAMPLE_LAMBDA[kind], (H, W))
    opt = torch.optim.Adam(model.parameters(), lr=EXAMPLE_LR)
    moving, fixed = _smooth_blobs(batch, H, W, g), _smooth_blobs(batch, H, W, g)
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        terms = train_step(model, opt, moving, fixed)
        dt = time.perf_counter() - t0
        if k >= warmup:
            times.append(dt)
    return times, terms


def main():
    from importlib.metadata import version

    print(f"icon_registration {version('icon_registration')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("convention check:", {k: f"{v:.2e}" for k, v in check_convention().items()})

    # 20 steps on random smooth blobs at batch 8
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = make_icon_model("icon", EXAMPLE_LAMBDA["icon"], (28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=EXAMPLE_LR)
    for step in range(20):
        moving, fixed = _smooth_blobs(8, 28, 28, g), _smooth_blobs(8, 28, 28, g)
        t0 = time.perf_counter()
        terms = train_step(model, opt, moving, fixed)
        dt = time.perf_counter() - t0
        print(f"  step {step:2d} {dt * 1e3:7.1f} ms  all={terms['all_loss']:.4f} "
              f"sim={terms['similarity_loss']:.4f} ic={terms['inverse_consistency_loss']:.2e}")
    phi = predict_map(model, moving, fixed)
    print("  predict_map:", tuple(phi.shape), phi.dtype, f"range [{phi.min():.3f}, {phi.max():.3f}]")

    # per-step timing at batch 128, 28x28
    for kind in ("icon", "gradicon"):
        times, _ = _time_steps(kind, 128)
        print(f"{kind:8s}+tallUNet2 batch 128 28x28: median {statistics.median(times):.3f} s/step "
              f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)})")


if __name__ == "__main__":
    main()
