"""Tiny models for CPU tests."""

import torch

from ditq.models import create


def make_tiny_dit(**overrides):
    """A DiT small enough for CPU tests that still has every layer type of DiT-XL/2 (hidden 128 fits g64/g128)."""
    config = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=2, num_heads=2, num_classes=10)
    config |= overrides
    return _perturbed(lambda: create("DiT-S/2", **config))


def make_tiny_mnist_dit():
    """DiT-MNIST's shape (1×32×32, 10 classes, patch 4) at a size that samples in well under a second."""
    return _perturbed(lambda: create("DiT-MNIST", depth=2, hidden_size=128, num_heads=2))


def _perturbed(build):
    """Official init zeroes adaLN and the final layer, which would make every quantized output equal to FP."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()
