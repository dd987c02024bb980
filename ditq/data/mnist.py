"""MNIST IDX loader and the pixel-space convention of DiT-MNIST.

IDX layout (big-endian): a 4-byte magic number (0x00000803 = 2051 for images, 0x00000801 = 2049
for labels: two zero bytes, a type code 0x08 = unsigned byte, the number of dimensions), then one
uint32 per dimension, then the data. Files may be gzip-compressed (``.gz``) or raw.

Model space: DiT-MNIST sees ``float32 (N, 1, 32, 32)`` in [-1, 1]. The 28x28 digit sits in the
middle and the 2-pixel border holds the background value -1 (black), so ``from_model_space``
crops that border back off and returns ``uint8 (N, 28, 28)``: the exact inverse of
``to_model_space`` on uint8 input.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

IMAGES_FILE = "t10k-images-idx3-ubyte"
LABELS_FILE = "t10k-labels-idx1-ubyte"
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
PAD = 2  # 28 + 2 * PAD = 32


def default_data_dir() -> Path:
    """The MNIST copy bundled in the package (``ditq/assets/mnist``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "mnist"


def load_mnist(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load the MNIST test split: ``uint8 (N, 28, 28)`` images and ``int64 (N,)`` labels.

    ``data_dir`` defaults to the bundled copy. Each file may be ``<name>.gz`` or raw ``<name>``
    (the gzip one wins when both exist). Nothing is ever downloaded.
    """
    folder = default_data_dir() if data_dir is None else Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder not found: {folder}")
    images = _read_idx(_find(folder, IMAGES_FILE), IMAGES_MAGIC, ndim=3)
    labels = _read_idx(_find(folder, LABELS_FILE), LABELS_MAGIC, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"MNIST images must be 28x28, got {images.shape[1:]} in {folder}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST image and label counts differ in {folder}: {images.shape[0]} images, "
            f"{labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"MNIST labels must be 0-9, found {int(labels.max())} in {folder}")
    return images, labels.astype(np.int64)


def to_model_space(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 (N, 28, 28)`` → ``float32 (N, 1, 32, 32)`` in [-1, 1], border padded with -1.

    The 2-pixel pad gives the patch-2 DiT a side that halves cleanly (32 → 16 tokens a side).
    """
    x = torch.as_tensor(images_uint8)
    if x.dtype != torch.uint8 or x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"to_model_space expects uint8 (N, 28, 28), got {x.dtype} {tuple(x.shape)}")
    x = x.to(torch.float32).div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 28, 28)
    return torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)  # (N, 1, 32, 32)


def from_model_space(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``float (N, 1, 32, 32)`` in [-1, 1] → ``uint8 (N, 28, 28)``: crop the border, round, clamp.

    Values outside [-1, 1] (samplers overshoot) are clamped rather than wrapped.
    """
    t = torch.as_tensor(x).detach()
    if not t.is_floating_point() or t.ndim != 4 or tuple(t.shape[1:]) != (1, 32, 32):
        raise ValueError(f"from_model_space expects float (N, 1, 32, 32), got {t.dtype} {tuple(t.shape)}")
    t = t[:, 0, PAD:-PAD, PAD:-PAD].to(device="cpu", dtype=torch.float64)  # (N, 28, 28)
    t = torch.round((t + 1.0) * 127.5).clamp_(0, 255)
    return t.to(torch.uint8).numpy()


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST file not found: {folder / name}[.gz]")


def _read_idx(path: Path, expected_magic: int, ndim: int) -> np.ndarray:
    """Read one unsigned-byte IDX file and check magic, dimensions and byte count."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # gzip raises these for corrupt or cut-off streams
        raise ValueError(f"cannot read IDX file {path}: {err}") from err

    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"IDX file {path} has magic number {magic}, expected {expected_magic}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, header needs {header_len}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise ValueError(f"IDX file {path} is {what}: {len(raw)} bytes, header {dims} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()
