"""Image grids: every row label is drawn whole, left of the images."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ditq.grid import LABEL_MARGIN, make_grid, tile

LONG_LABEL = "SVDQuant W4A8-FP8 g64 r32 +GPTQ"  # the demo's recipe row


def _dark_pixels(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) < 128).sum())


def _label_alone(label: str) -> Image.Image:
    canvas = Image.new("RGB", (400, 40), "white")
    ImageDraw.Draw(canvas).text((LABEL_MARGIN, 10), label, fill="black")
    return canvas


@pytest.mark.parametrize("label", ["FP16", LONG_LABEL])
def test_row_labels_are_never_covered_by_the_images(label):
    white = torch.ones(3, 1, 8, 8)  # images that draw nothing dark: every dark pixel belongs to the label
    grid = make_grid([(label, white)])
    assert _dark_pixels(grid) == _dark_pixels(_label_alone(label)) > 0
    first_image_x = grid.width - 3 * (8 * 2 + 2) - 2
    dark_columns = np.nonzero((np.asarray(grid.convert("L")) < 128).any(axis=0))[0]
    assert dark_columns.max() < first_image_x


def test_the_label_column_is_as_wide_as_its_widest_label():
    images = -torch.ones(2, 1, 8, 8)
    short, long = make_grid([("FP16", images)]), make_grid([("FP16", images), (LONG_LABEL, images)])
    assert long.width > short.width
    assert make_grid([("", images)]).width == tile(images, per_row=2).width == 2 * (8 * 2 + 2) + 2  # no labels


def test_tile_rows():
    images = torch.zeros(5, 3, 4, 4)
    grid = tile(images, per_row=2, scale=1)
    assert grid.size == (2 * (4 + 2) + 2, 3 * (4 + 2) + 2)
    with pytest.raises(ValueError, match="per_row must be a positive integer"):
        tile(images, per_row=0)
