"""Large-DiT: the LLaMA-style DiT that TerDiT quantizes (Alpha-VLLM Large-DiT-ImageNet).

Blocks use RMSNorm pre-norm, a SwiGLU feed-forward, bias-free attention/feed-forward Linears and an
optional QK-norm; conditioning is adaLN as in DiT. The conditioning vector ``c = t_emb + y_emb``
has width ``min(hidden_size, 1024)`` as in Large-DiT, so the adaLN Linears map 1024 → 6·D for the
big configs. ``adaln_norm=True`` is TerDiT's change: an RMSNorm over the whole 6·D output of the
adaLN Linear, before it is split into shift/scale/gate, that keeps ternary adaLN outputs in range.

Embedders, final layer, forward signature and model attributes are DiT's (conv patch embedder and
fixed sin-cos positions; Large-DiT's linear patchify and 1-D RoPE are not reproduced), so every
tool that runs a DiT runs this one. Module names (what quantization recipes match):

    blocks.i.norm1, blocks.i.norm2     RMSNorm(D) before attention / feed-forward
    blocks.i.attn.qkv                  Linear D → 3D, no bias, rows [q | k | v]
    blocks.i.attn.q_norm, .k_norm      LayerNorm(D) on q and k (only with qk_norm)
    blocks.i.attn.proj                 Linear D → D, no bias
    blocks.i.mlp.w1, blocks.i.mlp.w3   Linear D → F, no bias (gate and up projections)
    blocks.i.mlp.w2                    Linear F → D, no bias (down projection)
    blocks.i.adaLN_modulation.1        Linear cond → 6D, bias (zero init)
    blocks.i.adaLN_modulation.2        RMSNorm(6D) (only with adaln_norm)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.models.dit import Attention, ConditionalTransformer, FinalLayer, modulate

MAX_COND_SIZE = 1024  # Large-DiT caps the width of the timestep/label condition at 1024


def swiglu_hidden_size(dim: int, mlp_ratio: float, multiple_of: int) -> int:
    """Feed-forward width F: 2/3 of ``mlp_ratio·dim`` (keeps SwiGLU's three matrices at the cost of
    a two-matrix MLP), rounded up to a multiple of ``multiple_of``: 1536 → 4096, 3072 → 8192."""
    hidden = int(2 * int(mlp_ratio * dim) / 3)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """Gated feed-forward ``w2(SiLU(w1·x) ⊙ w3·x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (N, T, D)


class LargeDiTBlock(nn.Module):
    """RMSNorm → modulate → attention / SwiGLU, each added back through an adaLN gate."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        cond_size: int,
        mlp_ratio: float,
        multiple_of: int,
        norm_eps: float,
        qk_norm: bool,
        adaln_norm: bool,
    ):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.attn = Attention(hidden_size, num_heads, bias=False, qk_norm=qk_norm)
        self.norm2 = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio, multiple_of))
        modulation = [nn.SiLU(), nn.Linear(cond_size, 6 * hidden_size)]
        if adaln_norm:
            modulation.append(nn.RMSNorm(6 * hidden_size, eps=norm_eps))  # one RMS over all six chunks
        self.adaLN_modulation = nn.Sequential(*modulation)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # 6 × (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class LargeDiT(ConditionalTransformer):
    """LLaMA-style class-conditional DiT; same inputs, outputs and attributes as :class:`DiT`.

    Defaults are the 600M configuration without TerDiT's adaLN RMSNorm (the zoo's
    ``LargeDiT-*`` entries turn it on).
    """

    arch = "large_dit"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1536,
        depth: int = 16,
        num_heads: int = 32,
        mlp_ratio: float = 4.0,
        multiple_of: int = 256,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        adaln_norm: bool = False,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        config = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=float(mlp_ratio),
            multiple_of=multiple_of,
            norm_eps=float(norm_eps),
            qk_norm=bool(qk_norm),
            adaln_norm=bool(adaln_norm),
            class_dropout_prob=float(class_dropout_prob),
            num_classes=num_classes,
            learn_sigma=bool(learn_sigma),
        )
        self.cond_size = min(hidden_size, MAX_COND_SIZE)
        self.adaln_norm = bool(adaln_norm)
        self._embedders(config, cond_size=self.cond_size)
        self.blocks = nn.ModuleList(
            LargeDiTBlock(
                hidden_size, num_heads, self.cond_size, mlp_ratio, multiple_of, norm_eps, qk_norm, adaln_norm
            )
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cond_size=self.cond_size)
        self.initialize_weights()
