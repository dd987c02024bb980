"""Image grids with labelled rows (Pillow), for `ditq sample` and the demo; the label column fits the widest label."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ditq.atomic import atomic_path
from ditq.checks import check_count

LABEL_MARGIN = 4  # pixels left and right of the widest row label


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(rows: list[tuple[str, torch.Tensor]], scale: int = 2, pad: int = 2) -> Image.Image:
    """One labelled row per (label, images) pair; every row must have the same image size."""
    if not rows:
        raise ValueError("make_grid needs at least one row")
    arrays = [(label, to_uint8(images)) for label, images in rows]
    n_cols = max(a.shape[0] for _, a in arrays)
    h, w, c = arrays[0][1].shape[1:]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    label_w = _label_width([label for label, _ in arrays])
    canvas = Image.new("RGB", (label_w + n_cols * cell_w + pad, len(arrays) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, array) in enumerate(arrays):
        if array.shape[1:] != (h, w, c):
            raise ValueError(f"row {label!r} has images of shape {array.shape[1:]}, expected {(h, w, c)}")
        y = pad + r * cell_h
        draw.text((LABEL_MARGIN, y + cell_h // 2 - 6), label, fill="black")
        for i, img in enumerate(array):
            tile = Image.fromarray(img[..., 0] if c == 1 else img).convert("RGB")
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + i * cell_w, y))
    return canvas


def tile(images: torch.Tensor, per_row: int, scale: int = 2) -> Image.Image:
    """An unlabelled grid of `images` (N, C, H, W) in [-1, 1], `per_row` to a row (the last may be shorter)."""
    check_count("per_row", per_row)
    return make_grid([("", images[i : i + per_row]) for i in range(0, len(images), per_row)], scale=scale)


def _label_width(labels: list[str]) -> int:
    """Pixels of the label column: the widest label as the default font draws it, plus margins (0: no labels)."""
    if not any(labels):
        return 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(measure.textbbox((0, 0), label)[2] for label in labels) + 2 * LABEL_MARGIN


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Atomic PNG write."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
