"""The affine stage inside registration (``--affine``, :func:`cyclereg.registration.register.align`): the
model runs on the moving image seen through the affine transform ``T``, the whole map is ``T∘Φ``, one
composite transform out that SimpleITK applies as cyclereg warps, ``.nii.gz`` with ``T`` folded in, the
Jacobian of the whole map, and the inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import cyclereg
from cyclereg.cli import main
from cyclereg.core.coords import identity_grid
from cyclereg.core.transforms import DisplacementField
from cyclereg.io.images import Geometry
from cyclereg.io.preprocess import Preprocessing
from cyclereg.io.transforms import affine_parts, affine_transform, read_affine
from cyclereg.registration.fixed_grid import on_fixed_grid
from cyclereg.registration.register import (Pair, Registration, align, map_physical, model_inputs, warp_file,
                                            write_outputs)

from test_affine import _moved, _phantom, _rotation
from test_physical import _oblique, blob


def _affine(dim: int) -> sitk.AffineTransform:
    """A rotation of 25 degrees with some scaling and shear, and a translation (fixed points to moving points)."""
    linear = _rotation(2 if dim == 3 else None, 25) @ (np.diag([1.1, 0.9, 1.05][:dim]) + 0.05 * np.eye(dim, k=1))
    return affine_transform(linear, np.array([4.0, -3.0, 2.0][:dim]))


def _pair(dim: int, labels: bool = False) -> Pair:
    fixed = blob((16, 14, 12)[:dim], (1.5, 0.8, 2.0)[:dim], (3.0, -4.0, 7.0)[:dim], _oblique(dim))
    moving = blob((15, 15, 13)[:dim], (1.3, 1.1, 1.9)[:dim], (1.0, -6.0, 5.0)[:dim], _oblique(dim, 0.25), seed=3)
    # The moving image centred where the affine transform takes the fixed image's centre.
    linear, offset = affine_parts(_affine(dim))
    centre = [np.array(im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()])) for im in (fixed, moving)]
    moving.SetOrigin(tuple(np.asarray(moving.GetOrigin()) + linear @ centre[0] + offset - centre[1]))
    label_map = None
    if labels:
        array = np.zeros(sitk.GetArrayFromImage(moving).shape, np.int16)
        array[tuple(slice(2, n // 2) for n in array.shape)] = 17
        array[tuple(slice(n // 2, n - 1) for n in array.shape)] = 1042
        label_map = sitk.GetImageFromArray(array)
        label_map.CopyInformation(moving)
    return Pair(fixed, moving, label_map, affine=_affine(dim))


def _registration(pair: Pair, field: torch.Tensor | None = None, reverse: torch.Tensor | None = None) -> Registration:
    """A registration with a given displacement field of the model grid's domain (zero: the identity), and
    its reverse."""
    grid, _, _ = model_inputs(pair, Preprocessing(spacing=(1.2,) * pair.fixed.GetDimension()))
    shape = tuple(reversed(grid.size))
    zero = torch.zeros(1, len(shape), *shape)
    phi = DisplacementField(zero if field is None else field)
    return Registration(pair, grid, phi, reverse=lambda: DisplacementField(zero if reverse is None else reverse))


def _smooth(shape, amplitude=0.03, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = amplitude * torch.randn(1, len(shape), *([4] * len(shape)), generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear",
                                           align_corners=True)


def _write(path, image):
    sitk.WriteImage(image, str(path))
    return path


def test_an_identity_model_leaves_exactly_the_affine_map(dim):
    """Φ = Id: every fixed voxel maps to T(x), and det J = det L everywhere (T scales volumes)."""
    pair = _pair(dim)
    grid = on_fixed_grid(_registration(pair))
    linear, offset = affine_parts(pair.affine)
    x = grid.fixed_physical[0].flatten(1).double().numpy()
    np.testing.assert_allclose(grid.moving_physical[0].flatten(1).double().numpy(), linear @ x + offset[:, None], atol=1e-3)
    np.testing.assert_allclose(grid.aligned_physical[0].flatten(1).double().numpy(), x, atol=1e-3)
    np.testing.assert_allclose(grid.det.numpy(), np.linalg.det(linear), rtol=1e-4)


def test_the_model_sees_the_moving_image_through_the_affine_transform(dim):
    """The moving image resampled through T onto the model grid equals it sampled at T(x) by SimpleITK."""
    pair = _pair(dim)
    prep = Preprocessing(spacing=(1.0,) * dim, intensity="none")  # finer than the moving image: no antialiasing
    grid, moving, _ = model_inputs(pair, prep)
    reference = sitk.Image(list(grid.size), sitk.sitkFloat32)
    reference.SetSpacing(grid.spacing), reference.SetOrigin(grid.origin), reference.SetDirection(grid.direction)
    expected = sitk.GetArrayFromImage(sitk.Resample(pair.moving, reference, pair.affine, sitk.sitkLinear, prep.range[0]))
    np.testing.assert_allclose(moving[0, 0].numpy(), expected, atol=1e-4)
    without = model_inputs(Pair(pair.fixed, pair.moving), prep)[1]
    assert not np.allclose(without[0, 0].numpy(), expected, atol=1e-2)  # the transform made a difference


def test_simpleitk_applies_the_composite_transform_like_cyclereg(tmp_path, dim):
    """``.h5``: one composite [T, D] transform; ``.nii.gz``: one field with T folded in. Both, applied by
    SimpleITK's resampler (`cyclereg warp`), give cyclereg's warped image and labels: < 1e-3 of the range."""
    pair = _pair(dim, labels=True)
    grid, _, _ = model_inputs(pair, Preprocessing(spacing=(1.2,) * dim))
    reg = _registration(pair, _smooth(tuple(reversed(grid.size))))
    write_outputs(reg, warped=tmp_path / "w.nii.gz", warped_labels=tmp_path / "l.nii.gz", transform=tmp_path / "t.h5")
    write_outputs(reg, transform=tmp_path / "field.nii.gz")
    composite = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "t.h5")))
    assert composite.GetNumberOfTransforms() == 2
    assert composite.GetNthTransform(0).GetName() == "AffineTransform"
    assert composite.GetNthTransform(1).GetName() == "DisplacementFieldTransform"
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz")))
    value_range = np.ptp(sitk.GetArrayFromImage(pair.moving))
    moving, fixed = _write(tmp_path / "moving.mha", pair.moving), _write(tmp_path / "fixed.mha", pair.fixed)
    assert np.abs(ours).max() > 0.1 * value_range  # the moving image is in view after the affine transform
    for transform in (tmp_path / "t.h5", tmp_path / "field.nii.gz"):
        warp_file(transform, moving, fixed, tmp_path / "theirs.mha")
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "theirs.mha")))
        assert np.abs(ours - theirs).max() < 1e-3 * value_range, transform
    warp_file(tmp_path / "t.h5", _write(tmp_path / "labels.mha", pair.moving_labels), fixed, tmp_path / "tl.mha", nearest=True)
    ours_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    assert {17, 1042} <= set(np.unique(ours_labels))
    assert (ours_labels == sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "tl.mha")))).mean() > 0.995


def test_a_field_map_is_written_on_its_own_nodes_and_holds_at_the_edge_voxels(tmp_path, dim):
    """A map that is a field on the model grid (field refinement, no network) is written on that grid's
    nodes, one border node added on each side, not on the fixed image's voxels; applied by ITK it is the
    map at every voxel, also at the edge voxels that lie beyond the outermost nodes of a coarse grid
    (4 mm nodes over 1.5-2 mm voxels), where the map holds its border value."""
    pair = _pair(dim)
    grid, _, _ = model_inputs(pair, Preprocessing(spacing=(4.0,) * dim))
    shape = tuple(reversed(grid.size))
    field = _smooth(shape, amplitude=0.05) + 0.04  # nonzero at the border: a missing border node shows
    reg = Registration(pair, grid, DisplacementField(field))
    write_outputs(reg, transform=tmp_path / "t.h5")
    composite = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "t.h5")))
    nodes = sitk.DisplacementFieldTransform(composite.GetNthTransform(1)).GetDisplacementField()
    assert nodes.GetSize() == tuple(n + 2 for n in grid.size)
    g = Geometry.of(pair.fixed)
    points = g.to_physical(identity_grid(tuple(reversed(g.size)), dtype=torch.float64))
    u = grid.from_physical(points)
    assert ((u < 0) | (u > 1)).any()  # voxels beyond the outermost nodes
    ours = map_physical(reg, points)[0].flatten(1).T.numpy()
    theirs = np.array([composite.TransformPoint(tuple(p)) for p in points[0].flatten(1).T.numpy()])
    np.testing.assert_allclose(theirs, ours, atol=1e-3)


def test_the_inverse_transform_undoes_the_whole_map(tmp_path, dim):
    """A translation of the model grid and its exact reverse: the inverse (composite ``.h5`` and the
    moving grid's ``.nii.gz``) takes T(Φ(x)) back to x, and the inverse warps the fixed image onto the
    moving image's grid."""
    pair = _pair(dim)
    grid, _, _ = model_inputs(pair, Preprocessing(spacing=(1.2,) * dim))
    shape = tuple(reversed(grid.size))
    shift = torch.tensor([0.04, -0.03, 0.02][:dim]).view(1, dim, *([1] * dim)).expand(1, dim, *shape).contiguous()
    reg = _registration(pair, shift, -shift)
    write_outputs(reg, transform=tmp_path / "t.h5", transform_inverse=tmp_path / "inv.h5")
    write_outputs(reg, transform_inverse=tmp_path / "inv.nii.gz")
    forward = sitk.ReadTransform(str(tmp_path / "t.h5"))
    g = Geometry.of(pair.fixed)
    points = g.to_physical(identity_grid(tuple(reversed(g.size)), dtype=torch.float64))[0].flatten(1).T.numpy()
    inside = points[::7]
    for name in ("inv.h5", "inv.nii.gz"):
        inverse = cyclereg.io.transforms.read_transform(tmp_path / name)
        moved = [forward.TransformPoint(tuple(p)) for p in inside]
        back = np.array([inverse.TransformPoint(q) for q in moved])
        if name == "inv.nii.gz":  # a field on the moving grid: only the points it covers
            g_m = Geometry.of(pair.moving)
            index = np.array([pair.moving.TransformPhysicalPointToContinuousIndex(q) for q in moved])
            covered = ((index >= 0) & (index <= np.array(g_m.size) - 1)).all(1)
            assert covered.mean() > 0.3
            back, expected = back[covered], inside[covered]
        else:
            expected = inside
        np.testing.assert_allclose(back, expected, atol=1e-3 * max(pair.fixed.GetSpacing()) * 10)


def test_a_prior_affine_file_is_used_as_it_is(tmp_path, dim):
    """``--affine FILE``: the file's transform is the pair's, and the whole map of an identity model is it."""
    path = tmp_path / "prior.tfm"
    sitk.WriteTransform(_affine(dim), str(path))
    pair = align(Pair(_pair(dim).fixed, _pair(dim).moving), path)
    linear, offset = affine_parts(pair.affine)
    expected = affine_parts(_affine(dim))
    np.testing.assert_allclose(linear, expected[0], atol=1e-9)
    np.testing.assert_allclose(offset, expected[1], atol=1e-9)
    assert align(pair, "none") is pair


def test_auto_affine_brings_a_rotated_scan_into_view():
    """A phantom rotated by 60 degrees: with ``--affine auto`` the identity model's warped image matches
    the fixed image; with ``--affine none`` it does not."""
    from conftest import random_two_step_model, tiny_config_dict
    from cyclereg.core.config import config_from_dict
    from cyclereg.models.modelfile import ModelInfo

    fixed = _phantom(3)
    moving, true = _moved(fixed, _rotation(0, 60), (5.0, -3.0, 2.0))
    steps = [{"network": "unet", "downsample": 2, "params": {"channels": [8, 16]}},
             {"network": "unet", "params": {"channels": [8, 16]}}]
    info = ModelInfo(config_from_dict(tiny_config_dict(model__steps=steps)), (16, 16, 16), Preprocessing(spacing=(4.0,) * 3))
    model = cyclereg.Model(random_two_step_model(3, (16, 16, 16), std=0.0), info)
    errors = {}
    for mode in ("auto", "none"):
        result = cyclereg.register(fixed, moving, model, affine=mode)
        warped, target = sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(fixed)
        errors[mode] = float(np.abs(warped - target).mean() / np.abs(target).mean())
    assert errors["auto"] < 0.15 < errors["none"], errors
    linear, offset = affine_parts(cyclereg.register(fixed, moving, model).affine)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    assert np.linalg.norm(linear @ centre + offset - np.array(true.TransformPoint(tuple(centre)))) < 1.5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 2D model, two 2D images, and transform files that are wrong in one way each."""
    from conftest import tiny_config_dict
    from cyclereg.core.config import config_from_dict
    from cyclereg.models.modelfile import ModelInfo, build_from_info, save_model

    c = tmp_path_factory.mktemp("affine_corpus")
    pair = _pair(2)
    _write(c / "fixed.nii.gz", pair.fixed)
    _write(c / "moving.nii.gz", pair.moving)
    info = ModelInfo(config_from_dict(tiny_config_dict()), (16, 16))
    save_model(c / "model.safetensors", build_from_info(info), info)
    sitk.WriteTransform(_affine(2), str(c / "prior.tfm"))
    sitk.WriteTransform(_affine(3), str(c / "affine3d.tfm"))
    field = sitk.Image([8, 8], sitk.sitkVectorFloat64, 2)
    field.SetSpacing((3.0, 3.0))
    array = np.random.default_rng(0).normal(size=(8, 8, 2))
    vector = sitk.GetImageFromArray(array, isVector=True)
    vector.CopyInformation(field)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(vector), str(c / "field.h5"))
    (c / "notes.txt").write_text("not a transform\n")
    (c / "pairs.csv").write_text("fixed,moving\nfixed.nii.gz,moving.nii.gz\n")
    return c


REG = ["register", "--model", "{c}/model.safetensors", "--fixed", "{c}/fixed.nii.gz", "--moving", "{c}/moving.nii.gz",
       "--transform", "{out}/t.h5", "--warped", "{out}/w.nii.gz"]
CASES = [
    ("not a transform", [*REG, "--affine", "{c}/notes.txt"], 1, "--affine {c}/notes.txt cannot be read as a transform (..."),
    ("3D transform, 2D images", [*REG, "--affine", "{c}/affine3d.tfm"], 1,
     "--affine {c}/affine3d.tfm is a 3D transform but the images are 2D"),
    ("displacement field as affine", [*REG, "--affine", "{c}/field.h5"], 1,
     "--affine {c}/field.h5 is not an affine transform (DisplacementFieldTransform); "
     "expected a matrix (affine, rigid, similarity) transform"),
    ("missing affine file", [*REG, "--affine", "{c}/nowhere.tfm"], 1, "--affine {c}/nowhere.tfm does not exist"),
    ("affine file for a CSV", ["register", "--model", "{c}/model.safetensors", "--pairs-csv", "{c}/pairs.csv",
                               "--out-dir", "{out}", "--affine", "{c}/prior.tfm"], 2,
     "--affine {c}/prior.tfm: with --pairs-csv, expected auto or none; name a transform file per pair in a column "
     "'affine' of the CSV"),
]


@pytest.mark.parametrize("case, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_affine_input_gives_one_line_and_no_output(corpus, tmp_path, capsys, case, argv, code, message):
    out = tmp_path / "out"
    out.mkdir()
    try:
        result = main([a.format(c=corpus, out=out) for a in argv])
    except SystemExit as exit_:
        result = exit_.code
    _, stderr = capsys.readouterr()
    expected = "cyclereg: error: " + message.format(c=corpus, out=out)
    if expected.endswith("..."):
        assert stderr.startswith(expected[:-3]) and stderr.count("\n") == 1, stderr
    else:
        assert stderr == expected + "\n"
    assert result == code
    assert list(out.iterdir()) == []


def test_register_with_a_prior_file_writes_the_composite(corpus, tmp_path, capsys):
    """From the shell: ``--affine FILE``, a composite ``.h5`` whose affine part is the file's, the
    inverse, and a summary that names the file."""
    import json

    argv = [a.format(c=corpus, out=tmp_path) for a in REG] + ["--affine", str(corpus / "prior.tfm"),
                                                           "--transform-inverse", str(tmp_path / "inv.h5")]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["affine"] == {"file": str(corpus / "prior.tfm")}
    composite = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "t.h5")))
    np.testing.assert_allclose(affine_parts(composite.GetNthTransform(0))[0], affine_parts(_affine(2))[0], atol=1e-9)
    assert sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "inv.h5"))).GetNumberOfTransforms() == 2
    assert read_affine(corpus / "prior.tfm", 2).GetDimension() == 2
    assert math.isfinite(summary["jacobian_min"])


def test_a_label_map_on_another_grid_is_warped_in_physical_space(tmp_path, capsys):
    """Labels stored on a grid of their own (coarser, shifted) are warped through their own geometry: the
    same as SimpleITK applying the written transform to them; a warning says so."""
    from cyclereg.registration.register import read_pair

    pair = _pair(3, labels=True)
    labels = sitk.Resample(pair.moving_labels, [8, 8, 7], sitk.Transform(), sitk.sitkNearestNeighbor,
                           tuple(np.asarray(pair.moving.GetOrigin()) + 0.7), (2.6, 2.2, 3.8), pair.moving.GetDirection(), 0,
                           pair.moving_labels.GetPixelID())
    paths = {k: _write(tmp_path / f"{k}.nii.gz", v) for k, v in (("fixed", pair.fixed), ("moving", pair.moving), ("labels", labels))}
    read = read_pair(paths["fixed"], paths["moving"], paths["labels"])
    assert "its labels are warped in physical space" in capsys.readouterr().err
    grid, _, _ = model_inputs(Pair(read.fixed, read.moving, read.moving_labels, affine=pair.affine),
                              Preprocessing(spacing=(1.2,) * 3))
    reg = _registration(Pair(read.fixed, read.moving, read.moving_labels, affine=pair.affine), _smooth(tuple(reversed(grid.size))))
    write_outputs(reg, warped_labels=tmp_path / "ours.nii.gz", transform=tmp_path / "t.h5")
    warp_file(tmp_path / "t.h5", paths["labels"], paths["fixed"], tmp_path / "theirs.nii.gz", nearest=True)
    ours, theirs = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{k}.nii.gz"))) for k in ("ours", "theirs"))
    assert {17, 1042} <= set(np.unique(ours))
    assert (ours == theirs).mean() > 0.99
