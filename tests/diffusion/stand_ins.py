"""Stand-ins for a DiT: just the attributes and call signature that ditq.diffusion relies on."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class TinyClassModel(nn.Module):
    """forward(x, t, y) -> (N, 2C or C, H, W); elementwise maths only, so it is batch-invariant."""

    def __init__(
        self, in_channels: int = 2, input_size: int = 4, num_classes: int = 3, learn_sigma: bool = True
    ):
        super().__init__()
        self.in_channels = in_channels
        self.input_size = input_size
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        out_channels = 2 * in_channels if learn_sigma else in_channels
        g = torch.Generator().manual_seed(1234)
        self.mix = nn.Parameter(torch.randn(out_channels, in_channels, generator=g) * 0.5)
        self.label = nn.Parameter(torch.randn(num_classes + 1, out_channels, generator=g) * 0.5)
        self.seen_training: list[bool] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.seen_training.append(self.training)
        h = (x[:, None] * self.mix[None, :, :, None, None]).sum(dim=2)  # (N, C_out, H, W)
        h = h + self.label[y][:, :, None, None] + torch.sin(t.float() / 250.0)[:, None, None, None]
        return torch.tanh(h)


def original_alphas_cumprod(num_timesteps: int = 1000) -> np.ndarray:
    """ᾱ of the 1000-step linear schedule, computed independently with numpy."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64))
