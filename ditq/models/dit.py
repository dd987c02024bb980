"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers").

Parameter names and shapes follow facebookresearch/DiT ``models.py`` so that the official
checkpoints (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``) load with ``strict=True``.
Every matrix multiply is a plain ``nn.Linear`` (the patch embedder is a ``Conv2d``), because
quantization finds layers by module name and swaps them.

The file reads in data-flow order: embedders → transformer block → final layer → model.
Shapes use N = batch, C = channels, H/W = spatial size, T = tokens, D = hidden size.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

ADALN_NORM_EPS = 1e-5  # TerDiT's RMSNorm eps (its Large-DiT norm_eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of normalised tokens, ``x·(1+scale) + shift`` broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Embedders: image patches, positions, timesteps, class labels
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Cuts a square (C, H, W) input into p×p patches and projects each to D with one conv."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"input spatial size {tuple(x.shape[-2:])} does not match the model's "
                f"input_size={self.input_size}"
            )
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), tokens in row-major patch order


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table of shape (grid_size², hidden_size).

    Token ``r·grid_size + c`` (row r, column c) gets ``[sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)]``
    with ``ω_k = 10000^(-k / (D/4))``, k < D/4: the column index fills the first half of the
    vector, as in the MAE/DiT table the official checkpoints were trained with. Computed in
    float64, returned as float32.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos table, got {hidden_size}")
    quarter = hidden_size // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (G², D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G², D/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (G², D)


class TimestepEmbedder(nn.Module):
    """Diffusion step t → sinusoid of ``frequency_embedding_size`` → MLP (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) possibly fractional steps → (N, dim) float32 ``[cos(t·f), sin(t·f)]``, f geometric."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )  # (dim/2,)
        args = t.float()[:, None] * freqs[None]  # (N, dim/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2·(dim/2))
        if dim % 2:
            emb = F.pad(emb, (0, 1))  # (N, dim)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label → vector. Row ``num_classes`` is the null class used by classifier-free guidance.

    The null row exists only when ``dropout_prob > 0`` (as in the official checkpoints). Labels are
    replaced by the null class at random only in training, or where ``force_drop_ids == 1``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)  # (N,)
        return self.embedding_table(labels)  # (N, D)


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` Linear and an output ``proj`` Linear.

    ``qkv`` output rows are laid out [q | k | v], each of D rows split into heads of D/H
    consecutive rows (the timm layout of the official weights). ``qk_norm`` (Large-DiT) adds a
    LayerNorm over the full width of q and of k before the split into heads. `fused_linears` tells
    quantization that `qkv` holds three projections (TerDiT keeps one ternary scale for each).
    """

    fused_linears: ClassVar[dict[str, int]] = {"qkv": 3}

    def __init__(self, dim: int, num_heads: int, bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Everything after the qkv projection: (N, T, 3·D) → (N, T, D)."""
        n, t, d = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.chunk(3, dim=-1)  # 3 × (N, T, D)
        q, k = self.q_norm(q), self.k_norm(k)  # (N, T, D)
        q, k, v = (z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))  # (N, H, T, D/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    """Feed-forward ``fc2(GELU_tanh(fc1(x)))`` with hidden width ``mlp_ratio·D``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the condition sets shift/scale/gate of both branches.

    ``adaLN_modulation`` = (SiLU, Linear D→6D); its zero init makes every block start as identity.
    ``adaln_norm`` (TerDiT) appends an RMSNorm with a learnable gain and one RMS over the whole 6·D
    modulation vector, which keeps the shift/scale/gate of a ternary adaLN Linear in the FP range.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, adaln_norm: bool = False
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        modulation = [nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)]
        if adaln_norm:
            modulation.append(nn.RMSNorm(6 * hidden_size, eps=ADALN_NORM_EPS))  # one RMS over all six chunks
        self.adaLN_modulation = nn.Sequential(*modulation)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )  # 6 × (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) → LayerNorm → Linear to p·p·out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_size: int | None = None):
        super().__init__()
        cond_size = hidden_size if cond_size is None else cond_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 × (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p·p·out_channels)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p·p·C) tokens of a square grid → (N, C, H, W) image; inverse of the patch order."""
    n, t, _ = x.shape
    grid = math.isqrt(t)
    if grid * grid != t:
        raise ValueError(f"{t} tokens do not form a square grid")
    x = x.reshape(n, grid, grid, patch_size, patch_size, channels)  # (N, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
    return x.reshape(n, channels, grid * patch_size, grid * patch_size)  # (N, C, H, W)


def initialize_weights(model: nn.Module) -> None:
    """The official DiT init, shared by every zoo model with the DiT layout.

    Xavier-uniform Linears with zero bias; the patch conv initialised as the Linear it is
    (fan_in = C·p·p; its bias keeps the Conv2d default); N(0, 0.02) label table and timestep MLP;
    the sin-cos position table; and zeros for every adaLN Linear and the output Linear, so each
    block starts as the identity and the model's first output is 0 (adaLN-Zero).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    pos_embed = sincos_pos_embed_2d(model.pos_embed.shape[-1], model.x_embedder.grid_size)
    model.pos_embed.data.copy_(pos_embed.unsqueeze(0))
    proj_weight = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(proj_weight.view(proj_weight.shape[0], -1))
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[1].weight)
        nn.init.zeros_(block.adaLN_modulation[1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ConditionalTransformer(nn.Module):
    """What every zoo transformer shares: the recorded config, the attributes samplers and checkpoints
    read, the patch/timestep/label embedders with fixed positions, the official init and `forward`.

    Subclasses call `_embedders(...)`, then set `blocks` and `final_layer`, then `initialize_weights()`.
    """

    arch = ""

    def _embedders(self, config: dict, cond_size: int) -> None:
        """Record `config` (JSON-safe constructor kwargs) and build everything before the blocks."""
        input_size, patch_size, hidden = config["input_size"], config["patch_size"], config["hidden_size"]
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.config = config
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = config["in_channels"]
        self.learn_sigma = config["learn_sigma"]
        self.out_channels = 2 * self.in_channels if self.learn_sigma else self.in_channels
        self.hidden_size = hidden
        self.num_heads = config["num_heads"]
        self.num_classes = config["num_classes"]
        self.x_embedder = PatchEmbed(input_size, patch_size, self.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(cond_size)
        self.y_embedder = LabelEmbedder(self.num_classes, cond_size, config["class_dropout_prob"])
        # A frozen Parameter (not a buffer) so that it is part of the official state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden), requires_grad=False)

    def initialize_weights(self) -> None:
        """(Re-)apply the official init; see :func:`initialize_weights`."""
        initialize_weights(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) int labels → (N, out_channels, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H·W / p²
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, cond)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p·p·out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)


class DiT(ConditionalTransformer):
    """Class-conditional diffusion transformer; predicts ε (and the variance interpolation v
    when ``learn_sigma``) for a noisy input ``x`` at step ``t`` with label ``y``."""

    arch = "dit"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        adaln_norm: bool = False,
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
            class_dropout_prob=float(class_dropout_prob),
            num_classes=num_classes,
            learn_sigma=bool(learn_sigma),
        )
        if adaln_norm:  # recorded only when on, so configs (and files) of plain DiTs are unchanged
            config["adaln_norm"] = True
        self.adaln_norm = bool(adaln_norm)
        self._embedders(config, cond_size=hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, adaln_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
