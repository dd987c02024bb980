"""MNIST IDX loader: the bundled files, every error path, and the model-space convention."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ditq.data import default_data_dir, from_model_space, load_mnist, to_model_space

IMAGES = "t10k-images-idx3-ubyte"
LABELS = "t10k-labels-idx1-ubyte"


def write_idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes, gz: bool) -> Path:
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + data
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_set(
    folder: Path, n_images=5, n_labels=5, gz=True, image_magic=2051, label_magic=2049, cut_images=0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_labels, dtype=np.uint8)
    data = images.tobytes()
    write_idx(folder / IMAGES, image_magic, images.shape, data[: len(data) - cut_images], gz)
    write_idx(folder / LABELS, label_magic, labels.shape, labels.tobytes(), gz)
    return images, labels


def test_bundled_files_load():
    images, labels = load_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test digits
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert (default_data_dir() / "README.md").is_file()


@pytest.mark.parametrize("gz", [True, False])
def test_small_files_round_trip(tmp_path, gz):
    images, labels = make_set(tmp_path, gz=gz)
    got_images, got_labels = load_mnist(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels.astype(np.int64))


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mnist(missing)


def test_missing_file(tmp_path):
    make_set(tmp_path)
    (tmp_path / f"{LABELS}.gz").unlink()
    with pytest.raises(FileNotFoundError, match=LABELS):
        load_mnist(tmp_path)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_wrong_magic(tmp_path, which):
    kwargs = {"image_magic": 2049} if which == "images" else {"label_magic": 2051}
    make_set(tmp_path, **kwargs)
    name = IMAGES if which == "images" else LABELS
    with pytest.raises(ValueError, match=f"{name}.*magic"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_data(tmp_path, gz):
    make_set(tmp_path, gz=gz, cut_images=100)
    with pytest.raises(ValueError, match=f"{IMAGES}.*truncated"):
        load_mnist(tmp_path)


def test_truncated_header(tmp_path):
    make_set(tmp_path, gz=False)
    (tmp_path / LABELS).write_bytes((2049).to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match=f"{LABELS}.*truncated"):
        load_mnist(tmp_path)


def test_cut_gzip_stream(tmp_path):
    make_set(tmp_path)
    path = tmp_path / f"{IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=IMAGES):
        load_mnist(tmp_path)


def test_extra_bytes(tmp_path):
    make_set(tmp_path, gz=False)
    path = tmp_path / LABELS
    path.write_bytes(path.read_bytes() + b"\x01")
    with pytest.raises(ValueError, match=f"{LABELS}.*longer"):
        load_mnist(tmp_path)


def test_count_mismatch(tmp_path):
    make_set(tmp_path, n_images=5, n_labels=4)
    with pytest.raises(ValueError, match="5 images, 4 labels"):
        load_mnist(tmp_path)


def test_wrong_image_size(tmp_path):
    make_set(tmp_path)
    data = np.zeros((5, 32, 32), np.uint8).tobytes()
    (tmp_path / f"{IMAGES}.gz").unlink()
    write_idx(tmp_path / IMAGES, 2051, (5, 32, 32), data, gz=True)
    with pytest.raises(ValueError, match="28x28"):
        load_mnist(tmp_path)


def test_model_space_convention():
    images, _ = load_mnist()
    x = to_model_space(images[:16])
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:-2, 2:-2] = False
    assert (x[:, 0, border] == -1).all()
    np.testing.assert_array_equal(from_model_space(x), images[:16])  # exact inverse


def test_from_model_space_clamps_and_rounds():
    x = torch.full((1, 1, 32, 32), -1.0)
    x[0, 0, 2, 2], x[0, 0, 2, 3], x[0, 0, 2, 4] = 1.7, -3.0, 0.0
    out = from_model_space(x)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert out[0, 0, :3].tolist() == [255, 0, 128]  # 0.0 → 127.5 rounds half to even


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), np.float32), np.zeros((28, 28), np.uint8)])
def test_to_model_space_rejects(bad):
    with pytest.raises(ValueError, match="uint8"):
        to_model_space(bad)


def test_from_model_space_rejects():
    with pytest.raises(ValueError, match="32, 32"):
        from_model_space(torch.zeros(2, 1, 28, 28))
