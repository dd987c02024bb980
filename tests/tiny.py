"""Tiny models for CPU tests."""

import torch
import torch.nn.functional as F
from torch import nn

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


class TinyBert(nn.Module):
    """A BERT-shaped encoder (token and position embeddings, post-norm layers with separate q/k/v, a pooler):
    a model no ditq adapter knows, with BERT's module names."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 2, vocab: int = 64, tokens: int = 16):
        super().__init__()
        self.heads = heads
        self.word_embeddings, self.position_embeddings = nn.Embedding(vocab, dim), nn.Embedding(tokens, dim)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "query": nn.Linear(dim, dim), "key": nn.Linear(dim, dim), "value": nn.Linear(dim, dim),
            "attention_output": nn.Linear(dim, dim), "intermediate": nn.Linear(dim, 4 * dim),
            "output": nn.Linear(4 * dim, dim), "norm1": nn.LayerNorm(dim), "norm2": nn.LayerNorm(dim),
        }) for _ in range(depth))
        self.pooler = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N, T) -> (N, D)
        x = self.word_embeddings(ids) + self.position_embeddings(torch.arange(ids.shape[1]))  # (N, T, D)
        for layer in self.layers:
            q, k, v = (layer[n](x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for n in ("query", "key", "value"))
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (N, T, D)
            x = layer["norm1"](x + layer["attention_output"](attn))
            x = layer["norm2"](x + layer["output"](F.gelu(layer["intermediate"](x))))
        return torch.tanh(self.pooler(x[:, 0]))


def make_tiny_bert(seed: int = 0) -> TinyBert:
    torch.manual_seed(seed)
    return TinyBert().eval()
