"""Data sources for training: a name → a function that returns the whole labelled dataset.

A source takes the run's `data_dir` (None = its default) and returns images in model space, float32
(N, C, H, W) in [−1, 1], and int64 labels (N,). The loop keeps the result on the device and draws batches
from it by index, so a source is only called once per run. MNIST (the bundled test split) is the default;
another dataset plugs in with `@register_data_source("name")` and `TrainConfig(data="name")`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ditq.data import load_mnist, to_model_space

DataSource = Callable[[str | None], tuple[torch.Tensor, torch.Tensor]]

DATA_SOURCES: dict[str, DataSource] = {}


def register_data_source(name: str) -> Callable[[DataSource], DataSource]:
    """Decorator: make `fn(data_dir) -> (images, labels)` selectable as `TrainConfig(data=name)`."""

    def register(fn: DataSource) -> DataSource:
        if name in DATA_SOURCES and DATA_SOURCES[name] is not fn:
            raise ValueError(f"data source {name!r} is already registered")
        DATA_SOURCES[name] = fn
        return fn

    return register


@register_data_source("mnist")
def mnist(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test split (10,000 digits) padded to 32×32: (N, 1, 32, 32) and (N,)."""
    try:
        images, labels = load_mnist(data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data_dir={data_dir!r}: {err}") from err
    return to_model_space(images), torch.as_tensor(labels, dtype=torch.long)


def load_dataset(
    source: str, data_dir: str | None, model: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, C, H, W) and labels (N,) of `source` on `device`, checked against `model`'s input.

    10,000 MNIST images are 40 MB in fp32: keeping them on the device replaces a DataLoader.
    """
    x, y = DATA_SOURCES[source](data_dir)
    want = (model.in_channels, model.input_size, model.input_size)
    if tuple(x.shape[1:]) != want:
        raise ValueError(
            f"the model expects inputs of shape {want}, data {source!r} is {tuple(x.shape[1:])}; "
            "check model_overrides (in_channels, input_size)"
        )
    if int(y.max()) >= model.num_classes:
        raise ValueError(f"labels go up to {int(y.max())} but the model has num_classes={model.num_classes}")
    return x.float().to(device), y.long().to(device)
