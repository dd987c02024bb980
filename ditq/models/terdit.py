"""The Large-DiT network as TerDiT's release defines it (``DiT_Llama`` in Lucky-Lance/TerDiT ``models.py``).

Parameter names and shapes are the release's, so its flat state dicts (TerDiT-600M, TerDiT-4.2B) map
onto this module by name (`ditq.methods.terdit.load_released` unpacks their ternary weights). It differs
from ditq's `LargeDiT` (a DiT-layout stand-in) exactly where the release does:

- patchify is a Linear over each p×p×C patch (features in (C, p, p) order), no position table;
- rotary position embedding over the flattened token index (1-D RoPE, θ = 10000, pairs of adjacent
  channels within a head; the release's `precompute_freqs_cis(head_dim, 4096)` indexed by token), applied
  to q and k after the optional qk-norm (LayerNorm over the full width, with affine);
- separate bias-free ``wq``, ``wk``, ``wv``, ``wo`` and a SwiGLU ``w2(SiLU(w1·x) ⊙ w3·x)``;
- RMSNorm pre-norms, and TerDiT's RMSNorm over the whole 6·D adaLN output (``adaln_norm``);
- the condition c = t_emb + y_emb of width min(D, 1024); the final layer is DiT's.

Module names (what recipes match):

    layers.i.attention.wq, .wk, .wv, .wo      Linear D → D, no bias
    layers.i.attention.q_norm, .k_norm        LayerNorm(D) (only with qk_norm)
    layers.i.feed_forward.w1, .w3             Linear D → F, no bias;  .w2 Linear F → D, no bias
    layers.i.attention_norm, .ffn_norm        RMSNorm(D)
    layers.i.adaLN_modulation.1               Linear min(D, 1024) → 6D, bias (zero init)
    layers.i.adaLN_modulation.2               RMSNorm(6D) (only with adaln_norm)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.models.dit import FinalLayer, LabelEmbedder, TimestepEmbedder, modulate, unpatchify
from ditq.models.large_dit import MAX_COND_SIZE, swiglu_hidden_size

ROPE_THETA = 10000.0


def rope_angles(num_tokens: int, head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, head_dim/2) float32 angles t·θ^(−2i/head_dim) of token t and channel pair i."""
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    return torch.outer(torch.arange(num_tokens, dtype=torch.float32, device=device), inv_freq)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (a, b) of x (N, T, H, hd) by its token's angle, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (N, T, H, hd/2, 2)
    a, b = pairs.unbind(-1)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # (1, T, 1, hd/2)
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # (N, T, H, hd/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # (N, T, H, hd)


class LlamaAttention(nn.Module):
    """Self-attention with separate q/k/v/o projections, optional qk-norm and 1-D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"hidden size {dim} must split into num_heads={num_heads} heads of even width")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.q_norm(self.wq(x)), self.k_norm(self.wk(x)), self.wv(x)  # 3 × (N, T, D)
        q, k, v = (z.view(n, t, self.num_heads, self.head_dim) for z in (q, k, v))  # (N, T, H, hd)
        angles = rope_angles(t, self.head_dim, x.device)  # (T, hd/2)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        out = F.scaled_dot_product_attention(*(z.transpose(1, 2) for z in (q, k, v)))  # (N, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class LlamaFeedForward(nn.Module):
    """SwiGLU: ``w2(SiLU(w1·x) ⊙ w3·x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (N, T, D)


class LlamaBlock(nn.Module):
    """RMSNorm → modulate → attention / SwiGLU, each added back through an adaLN gate."""

    def __init__(self, dim: int, num_heads: int, cond_size: int, ffn_dim: int, norm_eps: float,
                 qk_norm: bool, adaln_norm: bool):  # fmt: skip
        super().__init__()
        self.attention = LlamaAttention(dim, num_heads, qk_norm)
        self.feed_forward = LlamaFeedForward(dim, ffn_dim)
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        modulation = [nn.SiLU(), nn.Linear(cond_size, 6 * dim)]
        if adaln_norm:
            modulation.append(nn.RMSNorm(6 * dim, eps=norm_eps))  # TerDiT: one RMS over all six chunks
        self.adaLN_modulation = nn.Sequential(*modulation)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # 6 × (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.attention_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.feed_forward(modulate(self.ffn_norm(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class LlamaDiT(nn.Module):
    """TerDiT's released network; same forward signature and sampler attributes as ditq's DiT.

    Defaults are TerDiT-600M at 256 px (32×32 latents); the 4.2B model is hidden_size=3072, depth=32.
    """

    arch = "llama_dit"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1536,
        depth: int = 16,
        num_heads: int = 32,
        multiple_of: int = 256,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        adaln_norm: bool = True,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, multiple_of=multiple_of, norm_eps=float(norm_eps),
            qk_norm=bool(qk_norm), adaln_norm=bool(adaln_norm), class_dropout_prob=float(class_dropout_prob),
            num_classes=num_classes, learn_sigma=bool(learn_sigma),
        )  # fmt: skip
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma, self.num_classes, self.num_heads = bool(learn_sigma), num_classes, num_heads
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.adaln_norm = hidden_size, bool(adaln_norm)
        self.cond_size = min(hidden_size, MAX_COND_SIZE)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(self.cond_size)
        self.y_embedder = LabelEmbedder(num_classes, self.cond_size, class_dropout_prob)
        ffn_dim = swiglu_hidden_size(hidden_size, 4.0, multiple_of)
        self.layers = nn.ModuleList(
            LlamaBlock(hidden_size, num_heads, self.cond_size, ffn_dim, norm_eps, qk_norm, adaln_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, cond_size=self.cond_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's init: Xavier Linears with zero bias, N(0, 0.02) timestep MLP and label table,
        zeros for every adaLN Linear and the output Linear (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        zeroed = [layer.adaLN_modulation[1] for layer in self.layers]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, T, C·p·p), tokens row-major, each patch's features in (C, p, p) order."""
        n, c, h, w = x.shape
        if (h, w) != (self.input_size, self.input_size):
            raise ValueError(f"input spatial size {(h, w)} does not match the model's input_size={self.input_size}")
        p = self.patch_size
        x = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
        return x.flatten(3).flatten(1, 2)  # (N, T, C·p·p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,), y: (N,) int labels → (N, out_channels, H, W)."""
        x = self.x_embedder(self.patchify(x))  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, min(D, 1024))
        for layer in self.layers:
            x = layer(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p·p·out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)
