"""Data: triangles & circles, IDX/MNIST reading, random pairs (cyclereg.data.datasets)."""

import gzip
import math

import numpy as np
import pytest
import torch

from cyclereg.core.config import DataConfig
from cyclereg.data.datasets import (MNIST_FILES, dataset_images, fixed_pairs, load_mnist, random_pairs, read_idx,
                           triangles_and_circles)
from cyclereg.core.errors import DataError

_IDX_CODE = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (big-endian header and data), written independently of cyclereg."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, _IDX_CODE[np.dtype(dtype)], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(dtype).tobytes()


def write_mnist(root, n=30, split="train", gz=False, seed=0):
    """Fake MNIST IDX files in ``root``: labels 0..9 cycling, each image filled with its index."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    images[:, 0, 0] = np.arange(n)  # marks the original index
    images_name, labels_name = MNIST_FILES[split]
    for name, array in ((images_name, images), (labels_name, labels)):
        raw = idx_bytes(array)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return images, labels


# --- triangles & circles ------------------------------------------------------------------------

def test_triangles_are_seeded():
    a = triangles_and_circles(6, size=24, seed=3)
    assert a.shape == (6, 1, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, triangles_and_circles(6, size=24, seed=3))
    assert not torch.equal(a, triangles_and_circles(6, size=24, seed=4))
    # Every image differs from the others.
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(6) * 1e9).min() > 1


def test_triangles_values_inside_and_outside():
    images = triangles_and_circles(40, size=32, seed=0)
    assert images.min() >= -1 and images.max() <= 1
    corners = images[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    for image in images[:, 0]:
        # The shape is convex: its centroid lies deep inside it (inradius >= 0.1 of the domain).
        ys, xs = torch.nonzero(image > 0, as_tuple=True)
        assert image[ys.float().mean().round().long(), xs.float().mean().round().long()] > 0.9
    assert torch.all(corners < -0.9)
    # Mostly saturated: ±1 away from the outline.
    assert (images.abs() > 0.9).float().mean() > 0.8


def _shape_ratio(image: torch.Tensor) -> float:
    """Farthest inside pixel from the centroid over the radius of a disk of the same area:
    1 for a disk, about 1.55 for an equilateral triangle."""
    inside = image > 0
    ys, xs = torch.nonzero(inside, as_tuple=True)
    cy, cx = ys.double().mean(), xs.double().mean()
    far = torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max()
    return float(far / math.sqrt(inside.sum() / math.pi))


def test_first_half_triangles_second_half_circles():
    n = 24
    images = triangles_and_circles(n, size=64, seed=1)[:, 0]
    checked = {True: 0, False: 0}
    for i, image in enumerate(images):
        inside = image > 0
        if inside[0].any() or inside[-1].any() or inside[:, 0].any() or inside[:, -1].any():
            continue  # cut by the border: the ratio would not tell
        is_triangle = i < n // 2
        ratio = _shape_ratio(image)
        assert (ratio > 1.35) if is_triangle else (ratio < 1.15), (i, ratio)
        checked[is_triangle] += 1
    assert checked[True] >= 3 and checked[False] >= 3


def test_heldout_and_test_triangles_differ_from_training():
    cfg = DataConfig(dataset="triangles", size=16, n_train=10, val_pairs=4)
    train = dataset_images(cfg, "train")
    held = dataset_images(cfg, "heldout")
    test = dataset_images(cfg, "test", n_test=6)
    assert train.shape == (10, 1, 16, 16) and held.shape == (64, 1, 16, 16) and test.shape == (6, 1, 16, 16)
    assert not torch.equal(train[0], held[0]) and not torch.equal(train[0], test[0])


# --- IDX and MNIST --------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.arange(-5, 5, dtype=np.int8),
    np.arange(12, dtype=">i4").reshape(3, 4) * -1000,
    np.linspace(-1, 1, 6).astype(">f8").reshape(2, 3),
    np.array([1.5, -2.25], dtype=">f4"),
    np.arange(6, dtype=">i2").reshape(1, 6),
], ids=["u8", "i8", "i4", "f8", "f4", "i2"])
def test_read_idx_round_trips(tmp_path, array, gz):
    raw = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(path)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_load_mnist_filters_the_digit(tmp_path, gz):
    images, labels = write_mnist(tmp_path, n=30, gz=gz)
    fives = load_mnist(tmp_path, "train", 5)
    assert fives.shape == (3, 1, 28, 28) and fives.dtype == torch.float32
    assert fives.min() >= 0 and fives.max() <= 1
    torch.testing.assert_close(fives[:, 0], torch.from_numpy(images[labels == 5].astype(np.float32) / 255))
    assert load_mnist(tmp_path, "train", None).shape == (30, 1, 28, 28)


def test_mnist_heldout_split_is_the_tail_of_the_training_digit(tmp_path):
    write_mnist(tmp_path, n=100)
    cfg = DataConfig(dataset="mnist", root=str(tmp_path), digit=3, holdout=0.2)
    train, held = dataset_images(cfg, "train"), dataset_images(cfg, "heldout")
    assert len(train) == 8 and len(held) == 2
    index = lambda t: (t[:, 0, 0, 0] * 255).round().long().tolist()  # noqa: E731
    assert index(train) == [3, 13, 23, 33, 43, 53, 63, 73] and index(held) == [83, 93]


def test_load_mnist_missing_files(tmp_path):
    with pytest.raises(DataError, match="has no file train-images-idx3-ubyte") as err:
        load_mnist(tmp_path, "train", 5)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="not a folder"):
        load_mnist(tmp_path / "nowhere", "train", 5)


def test_load_mnist_bad_digit_and_split(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(DataError, match="digit 12"):
        load_mnist(tmp_path, "train", 12)
    with pytest.raises(DataError, match="split 'validation'"):
        load_mnist(tmp_path, "validation", 5)


def test_load_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x89PNG" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="bad magic number") as err:
        load_mnist(tmp_path, "train", 5)
    assert str(path) in str(err.value)


def test_load_mnist_truncated_data(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="header declares") as err:
        load_mnist(tmp_path, "train", 5)
    assert str(path) in str(err.value)


def test_load_mnist_mismatched_files(tmp_path):
    write_mnist(tmp_path, n=30)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29, np.uint8)))
    with pytest.raises(DataError, match="do not hold matching images and labels"):
        load_mnist(tmp_path, "train", 5)


def test_read_idx_errors_name_the_file(tmp_path):
    path = tmp_path / "x.idx"
    with pytest.raises(DataError, match="cannot read") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(path)
    good = gzip.compress(idx_bytes(np.zeros((4, 5), np.uint8)))
    path.write_bytes(good[: len(good) // 2])  # gzip stream cut short
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(np.zeros((4, 5, 6), np.uint8))[:9])  # magic + 5 of the 12 size bytes
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "x.idx.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 32)  # gzip header, bad deflate data
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


# --- pairs ----------------------------------------------------------------------------------------

def test_random_pairs_are_distinct_and_seeded():
    for n_images in (2, 3, 50):
        pairs = random_pairs(n_images, 500, torch.Generator().manual_seed(0))
        assert pairs.shape == (500, 2)
        assert torch.all(pairs[:, 0] != pairs[:, 1])
        assert pairs.min() >= 0 and pairs.max() < n_images
    a = random_pairs(50, 20, torch.Generator().manual_seed(1))
    assert torch.equal(a, random_pairs(50, 20, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, random_pairs(50, 20, torch.Generator().manual_seed(2)))
    # Every image is drawn as moving and as fixed.
    many = random_pairs(5, 1000, torch.Generator().manual_seed(0))
    assert set(many[:, 0].tolist()) == set(range(5)) == set(many[:, 1].tolist())
    with pytest.raises(DataError, match="at least two images"):
        random_pairs(1, 3, torch.Generator())


def test_fixed_pairs_are_distinct_images():
    images = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 4, 4)
    moving, fixed = fixed_pairs(images, 30, seed=0)
    assert moving.shape == (30, 1, 4, 4)
    assert torch.all(moving[:, 0, 0, 0] != fixed[:, 0, 0, 0])
    assert torch.equal(moving, fixed_pairs(images, 30, seed=0)[0])


# --- augmentation ---------------------------------------------------------------------------------

def test_random_affine_is_seeded_and_identity_at_zero_strength(dim):
    from cyclereg.data.datasets import random_affine
    from conftest import smooth_image, small_shape

    x = smooth_image(small_shape(dim), 3, seed=4)
    assert torch.allclose(random_affine(x, 0.0, torch.Generator().manual_seed(1)), x, atol=1e-5)
    a = random_affine(x, 0.1, torch.Generator().manual_seed(1))
    b = random_affine(x, 0.1, torch.Generator().manual_seed(1))
    c = random_affine(x, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().mean() > 1e-3
