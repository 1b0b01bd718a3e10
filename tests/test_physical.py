"""Physical space: image I/O round trips, orientation, the model grid, and registrations carried back to
the fixed image's grid so that ITK tools agree with cyclereg."""

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cyclereg.core.coords import identity_grid
from cyclereg.core.errors import DataError
from cyclereg.io.images import Geometry, read_image
from cyclereg.io.preprocess import Preprocessing, model_grid, prepare
from cyclereg.registration.fixed_grid import on_fixed_grid
from cyclereg.registration.register import Pair, Registration, map_physical, model_inputs, warp_file, write_outputs
from cyclereg.core.transforms import Composed, DisplacementField, Transform


def _oblique(dim, angle=0.4):
    c, s = math.cos(angle), math.sin(angle)
    if dim == 2:
        return (c, -s, s, c)
    rot_z = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return tuple((rot_z @ rot_x).ravel())


def blob(size, spacing, origin, direction=None, pixel=sitk.sitkFloat32, seed=0):
    """A smooth image of ITK ``size`` with the given geometry: Gaussian blobs plus a ramp."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 1, n) for n in reversed(size)], indexing="ij")
    array = 0.2 * axes[-1]
    for _ in range(3):
        centre = rng.uniform(0.3, 0.7, len(size))
        array = array + np.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / 0.04)
    image = sitk.GetImageFromArray((100 * array).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return sitk.Cast(image, pixel)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_write_read_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    image = blob((9, 8, 7), (0.7, 1.2, 2.5), (-12.0, 30.5, 4.0), _oblique(3))
    path = tmp_path / f"image{suffix}"
    sitk.WriteImage(image, str(path))
    first = read_image(path)
    sitk.WriteImage(first, str(tmp_path / f"again{suffix}"))
    second = read_image(tmp_path / f"again{suffix}")
    for img in (first, second):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(img.GetSpacing(), image.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), image.GetDirection(), atol=1e-5)


def test_nifti_ras_header_is_read_as_lps(tmp_path):
    """A NIfTI affine is RAS; inside cyclereg (ITK) points are LPS: x and y change sign."""
    affine = np.array([[2.0, 0, 0, 10], [0, 3.0, 0, 20], [0, 0, 4.0, 30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32) + np.arange(7), affine), str(tmp_path / "ras.nii.gz"))
    image = read_image(tmp_path / "ras.nii.gz")
    np.testing.assert_allclose(image.GetSpacing(), (2, 3, 4))
    np.testing.assert_allclose(image.GetOrigin(), (-10, -20, 30))
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([-1, -1, 1]), atol=1e-12)
    # Voxel (i, j, k) of the NIfTI array sits at RAS affine @ (i, j, k): LPS (-x, -y, z).
    corner = Geometry.of(image).to_physical(torch.ones(1, 3, 1, 1, 1, dtype=torch.float64))
    np.testing.assert_allclose(corner.flatten().numpy(), [-(10 + 2 * 4), -(20 + 3 * 5), 30 + 4 * 6])


def test_physical_points_round_trip(dim):
    size = (9, 8, 7)[:dim]
    image = blob(size, (0.7, 1.2, 2.5)[:dim], (-12.0, 30.5, 4.0)[:dim], _oblique(dim))
    g = Geometry.of(image)
    u = torch.rand(2, dim, 4, 3, dtype=torch.float64)
    np.testing.assert_allclose(g.from_physical(g.to_physical(u)), u, atol=1e-12)
    index = (2, 3, 1)[:dim]
    point = image.TransformIndexToPhysicalPoint(index)
    domain = torch.tensor([i / (n - 1) for i, n in zip(index, size)][::-1], dtype=torch.float64).view(1, dim, 1)
    np.testing.assert_allclose(g.to_physical(domain).flatten().numpy(), point, atol=1e-12)


def test_model_grid_keeps_the_centre_and_direction_and_rounds_the_size():
    image = blob((160, 192, 224), (1.0, 1.0, 1.0), (-80.0, -100.0, -90.0), _oblique(3))
    grid = model_grid(image, Preprocessing(spacing=(2.0, 2.0, 2.0), pad_multiple=16))
    assert grid.size == (80, 96, 112) and grid.direction == image.GetDirection()
    ref = Geometry.of(image)
    centre = lambda g: g.to_physical(torch.full((1, 3, 1), 0.5, dtype=torch.float64)).flatten()  # noqa: E731
    np.testing.assert_allclose(centre(grid), centre(ref), atol=1e-9)
    odd = model_grid(image, Preprocessing(spacing=(3.0, 3.0, 3.0), pad_multiple=16))
    assert odd.size == (64, 64, 80)  # 53, 64, 75 rounded up
    assert model_grid(image, Preprocessing()) == Geometry.of(image)  # no spacing: the image's own grid


def test_prepare_normalises_with_percentiles_and_windows():
    image = blob((20, 18), (1.0, 1.0), (0.0, 0.0))
    array = sitk.GetArrayFromImage(image)
    grid = Geometry.of(image)
    out = prepare(image, grid, Preprocessing("percentile", percentiles=(1.0, 99.0)))
    lo, hi = np.percentile(array, [1.0, 99.0])
    assert float(out.min()) == pytest.approx(0, abs=1e-6) and float(out.max()) == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(out[0, 0].numpy(), np.clip((array - lo) / (hi - lo), 0, 1), atol=1e-6)
    window = prepare(image, grid, Preprocessing("window", window=(10.0, 50.0), range=(-1.0, 1.0)))
    np.testing.assert_allclose(window[0, 0].numpy(), np.clip((array - 10) / 40, 0, 1) * 2 - 1, atol=1e-6)
    with pytest.raises(DataError, match="constant"):
        prepare(sitk.Image([5, 5], sitk.sitkFloat32), Geometry.of(sitk.Image([5, 5], sitk.sitkFloat32)), Preprocessing())


def test_moving_image_lands_in_physical_space_on_the_model_grid():
    """A moving image on another grid (spacing, origin, size) is resampled physically: where both
    images show the same physical content, the prepared inputs agree."""
    fixed = blob((30, 26, 22), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), seed=1)
    # The same content on a larger grid with another origin (whole voxels away) and size.
    moving = sitk.Resample(fixed, (36, 31, 25), sitk.Transform(), sitk.sitkLinear, (-2.0, -3.0, -1.0),
                           (1.0, 1.0, 1.0), fixed.GetDirection(), 0.0, sitk.sitkFloat32)
    prep = Preprocessing("none", spacing=(1.0, 1.0, 1.0))
    _, m, f = model_inputs(Pair(fixed, moving), prep)
    assert (m - f).abs().max() < 1e-4 * float(f.max())


def test_images_that_do_not_overlap_are_refused():
    fixed = blob((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    moving = blob((10, 10, 10), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0))
    with pytest.raises(DataError, match="do not overlap"):
        model_inputs(Pair(fixed, moving), Preprocessing())


def _constant_registration(pair, prep, shift):
    """A registration whose map translates the model grid's domain by ``shift`` (tensor order)."""
    grid, _, _ = model_inputs(pair, prep)
    shape = tuple(reversed(grid.size))
    field = torch.tensor(shift, dtype=torch.float32).view(1, len(shape), *([1] * len(shape))).expand(1, len(shape), *shape)
    return Registration(pair, grid, DisplacementField(field.contiguous()))


def test_a_known_shift_of_the_model_grid_is_a_known_physical_displacement():
    """Oblique direction, anisotropic spacing: a domain shift of the model grid is the physical
    displacement direction @ (spacing * (size - 1) * shift) at every fixed voxel, det J = 1."""
    fixed = blob((14, 12, 10), (1.5, 0.8, 2.0), (3.0, -4.0, 7.0), _oblique(3))
    moving = blob((12, 12, 12), (1.3, 1.3, 1.3), (2.0, -5.0, 5.0), _oblique(3, 0.3))
    prep = Preprocessing(spacing=(1.0, 1.0, 1.0))
    shift = (0.05, -0.02, 0.03)  # tensor order (z, y, x)
    reg = _constant_registration(Pair(fixed, moving), prep, shift)
    result = on_fixed_grid(reg)
    g = reg.grid
    expected = g.matrix() @ (np.array(shift[::-1]) * (np.array(g.size) - 1))
    np.testing.assert_allclose(result.displacement[0].flatten(1).T.numpy(), np.broadcast_to(expected, (14 * 12 * 10, 3)), atol=1e-4)
    np.testing.assert_allclose(result.det.numpy(), 1.0, atol=1e-4)


def _smooth_registration(pair, prep, amplitude=0.03, seed=0):
    grid, _, _ = model_inputs(pair, prep)
    shape = tuple(reversed(grid.size))
    g = torch.Generator().manual_seed(seed)
    coarse = amplitude * torch.randn(1, len(shape), *([4] * len(shape)), generator=g)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    field = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return Registration(pair, grid, DisplacementField(field))


class _Pointwise(Transform):
    """``transform`` called on points only: on_fixed_grid evaluates it at every voxel."""

    def __init__(self, transform):
        self.transform = transform

    def displacement(self, points):
        return self.transform.displacement(points)


@pytest.mark.parametrize("composed", [False, True], ids=["field", "two-fields-composed"])
@pytest.mark.parametrize("common_space", [False, True], ids=["fixed-axes", "common-space-axes"])
def test_maps_evaluated_axis_by_axis_on_the_fixed_grid_are_the_maps_called_at_every_voxel(dim, composed, common_space):
    """on_fixed_grid's fast path (a field on a model grid with the fixed image's axes, an affine stage)
    against calling the same map at every voxel: the same points, displacements and Jacobians; and both paths
    (a network's composed fields take the general one) against the whole map at the voxels' physical
    points (map_physical), also on a model grid of a common space's axes (oblique to the fixed image's)."""
    from cyclereg.io.transforms import affine_transform

    fixed = blob((16, 14, 12)[:dim], (1.5, 0.8, 2.0)[:dim], (3.0, -4.0, 7.0)[:dim], _oblique(dim))
    moving = blob((15, 15, 13)[:dim], (1.3, 1.1, 1.9)[:dim], (1.0, -6.0, 5.0)[:dim], _oblique(dim, 0.25), seed=3)
    linear = np.eye(dim) + 0.05 * np.random.default_rng(1).standard_normal((dim, dim))
    pair = Pair(fixed, moving, affine=affine_transform(linear, np.full(dim, 1.5)))
    direction = tuple(np.eye(dim).ravel()) if common_space else None
    reg = _smooth_registration(pair, Preprocessing(spacing=(2.1,) * dim, direction=direction), amplitude=0.05)
    if composed:
        coarse = 0.05 * torch.randn(1, dim, *([3] * dim), generator=torch.Generator().manual_seed(4))
        reg = Registration(pair, reg.grid, Composed(DisplacementField(coarse), reg.phi))
    fast = on_fixed_grid(reg)
    slow = on_fixed_grid(Registration(pair, reg.grid, _Pointwise(reg.phi)))
    for name in ("moving_domain", "aligned_displacement", "moving_physical", "aligned_physical", "displacement", "det"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), atol=1e-4, rtol=1e-4, msg=name)
    assert float(fast.det.std()) > 0.01  # a map with something to compare
    expected = map_physical(reg, fast.fixed_physical.double())
    torch.testing.assert_close(fast.moving_physical.double(), expected, atol=1e-3, rtol=0)


def test_simpleitk_applies_the_written_transform_like_cyclereg(tmp_path, dim):
    """The exported transform, applied by SimpleITK's resampler (and by `cyclereg warp`), gives the
    same warped image and label map as cyclereg: max difference < 1e-3 of the intensity range."""
    fixed = blob((16, 14, 12)[:dim], (1.5, 0.8, 2.0)[:dim], (3.0, -4.0, 7.0)[:dim], _oblique(dim))
    moving = blob((15, 15, 13)[:dim], (1.3, 1.1, 1.9)[:dim], (1.0, -6.0, 5.0)[:dim], _oblique(dim, 0.25), seed=3)
    labels_array = np.zeros(sitk.GetArrayFromImage(moving).shape, np.int16)
    labels_array[tuple(slice(2, n // 2) for n in labels_array.shape)] = 17
    labels_array[tuple(slice(n // 2, n - 1) for n in labels_array.shape)] = 1042
    labels = sitk.GetImageFromArray(labels_array)
    labels.CopyInformation(moving)
    reg = _smooth_registration(Pair(fixed, moving, labels), Preprocessing(spacing=(1.2,) * dim))
    out = {k: tmp_path / f"{k}.nii.gz" for k in ("warped", "labels", "field")}
    write_outputs(reg, warped=out["warped"], warped_labels=out["labels"], transform=tmp_path / "t.h5")
    write_outputs(reg, transform=out["field"])
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out["warped"])))
    value_range = np.ptp(sitk.GetArrayFromImage(moving))
    for transform in (tmp_path / "t.h5", out["field"]):
        warp_file(transform, _write(tmp_path / "moving.mha", moving), _write(tmp_path / "fixed.mha", fixed), tmp_path / "w.mha")
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.mha")))
        assert np.abs(ours - theirs).max() < 1e-3 * value_range
    warp_file(tmp_path / "t.h5", _write(tmp_path / "labels.mha", labels), tmp_path / "fixed.mha", tmp_path / "wl.mha", nearest=True)
    ours_labels = sitk.ReadImage(str(out["labels"]))
    theirs_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "wl.mha")))
    assert ours_labels.GetPixelID() == sitk.sitkInt16
    ours_labels = sitk.GetArrayFromImage(ours_labels)
    assert set(np.unique(ours_labels)) <= {0, 17, 1042} and {17, 1042} <= set(np.unique(ours_labels))
    assert (ours_labels == theirs_labels).mean() > 0.995  # nearest-neighbour ties may fall either way


def _write(path, image):
    sitk.WriteImage(image, str(path))
    return path


def test_identity_grid_of_fixed_maps_into_model_domain_exactly_without_spacing():
    """Without a model spacing the model grid is the fixed image's grid: no resampling at all."""
    fixed = blob((12, 10), (0.5, 2.0), (1.0, 1.0), _oblique(2))
    grid = model_grid(fixed, Preprocessing())
    x = Geometry.of(fixed).to_physical(identity_grid((10, 12), dtype=torch.float64))
    np.testing.assert_allclose(grid.from_physical(x).numpy(), identity_grid((10, 12), dtype=torch.float64).numpy(), atol=1e-12)


def test_a_coarser_model_grid_is_smoothed_along_the_axes_it_coarsens_only():
    """Stripes of period 3 voxels along x alias into a pattern on a grid 4 times coarser in x unless smoothed
    first; stripes of period 4 along y, an axis the grid keeps, stay."""
    from cyclereg.io.preprocess import Preprocessing, model_grid, prepare

    y, x = np.mgrid[0:64, 0:64]
    image = sitk.GetImageFromArray(((x % 3 == 0) + 2 * ((y // 2) % 2)).astype(np.float32))
    prep = Preprocessing(intensity="none", spacing=(4.0, 1.0))
    out = prepare(image, model_grid(image, prep), prep)[0, 0].numpy()[4:-4, 2:-2]
    along_x = out - out.mean(axis=1, keepdims=True)  # what is left of the x stripes
    assert np.abs(along_x).max() < 0.05
    assert np.ptp(out.mean(axis=1)) > 1.5  # the y stripes (0 or 2, plus the x stripes' mean 1/3)


def test_the_antialiasing_blur_is_half_the_new_spacing_whatever_the_shrink():
    """The smoothing before a coarser grid adds a variance of (new spacing / 2)² along each axis it
    coarsens, whether blocks of voxels are averaged first (4 mm from 1 mm) or not (1.5 mm from 1 mm):
    a Gaussian blob of σ 3 mm keeps its centre and comes out with variance 9 + (t / 2)² mm². A spacing a
    rounding error below 4 mm (a 256 mm extent over 64 voxels) is still averaged in blocks of two."""
    from cyclereg.io.preprocess import _antialias

    x = np.arange(160.0)
    for target in (4.0, 256 / 64 * (1 - 1e-16), 1.5):
        image = sitk.GetImageFromArray(np.exp(-0.5 * ((x - 70.3) / 3.0) ** 2)[None].repeat(8, 0).astype(np.float32))
        image.SetOrigin((-20.0, 5.0))
        grid = Geometry((40, 8), (target, 1.0), (0.0, 5.0), (1.0, 0.0, 0.0, 1.0))
        out = _antialias(image, grid)
        values = sitk.GetArrayFromImage(out)[0]
        centres = np.array([out.TransformIndexToPhysicalPoint((i, 0))[0] for i in range(len(values))])
        mean = (values * centres).sum() / values.sum()
        variance = (values * (centres - mean) ** 2).sum() / values.sum()
        assert abs(mean - 50.3) < 0.05
        assert abs(variance - (9 + (target / 2) ** 2)) < 0.2, (target, variance)
        assert out.GetSpacing()[0] == (2.0 if target > 3 else 1.0), (target, out.GetSpacing())
