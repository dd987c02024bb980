"""Data for training: sources (a name → a function that returns the whole labelled dataset) and the order
in which a rank draws batches from it.

A source takes the run's `data_dir` (None = its default) and returns images in model space, float32
(N, C, H, W) in [−1, 1], and int64 labels (N,). The loop keeps the result on the device and draws batches
from it by index, so a source is only called once per run. MNIST (the bundled test split) is the default;
another dataset plugs in with `@register_data_source("name")` and `TrainConfig(data="name")`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from ditq.data import load_mnist, to_model_space
from ditq.training.distributed import DistEnv

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


class Batches:
    """This rank's batches: a seeded permutation per epoch (DistributedSampler) cut into equal slices."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, env: DistEnv, *, global_batch_size: int, seed: int,
        hflip: bool,
    ) -> None:  # fmt: skip
        self.images, self.labels, self.hflip = images, labels, hflip
        self.batch = global_batch_size // env.world_size
        self.sampler = DistributedSampler(
            range(len(images)), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed
        )
        self.steps_per_epoch = len(self.sampler) // self.batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"global_batch_size={global_batch_size} exceeds the {len(images)} images available")
        self._epoch, self._order = -1, torch.empty(0)

    def at(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (B, C, H, W), y (B,)) of the 0-based step; random flips draw from `gen`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            order = torch.tensor(list(self.sampler), device=self.images.device)
            self._order = order[: self.steps_per_epoch * self.batch].view(self.steps_per_epoch, self.batch)
            self._epoch = epoch
        idx = self._order[position]
        x, y = self.images[idx], self.labels[idx]
        if self.hflip:
            flip = torch.rand(self.batch, generator=gen, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y
