"""DiT: the official state-dict layout, the official init, and the forward pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditq.models import DiT, create
from ditq.models.dit import Attention, TimestepEmbedder, sincos_pos_embed_2d, unpatchify

# ---- The official DiT-XL/2 256×256 state dict, read off facebookresearch/DiT models.py ------
# (timm PatchEmbed → x_embedder.proj conv; timm Attention(qkv_bias=True) → attn.qkv/attn.proj;
# timm Mlp → mlp.fc1/fc2; Sequential(SiLU, Linear) → adaLN_modulation.1; LayerNorms carry no
# affine parameters; the label table has 1000 classes + 1 null row; learn_sigma → 8 channels.)
D, P, C_OUT = 1152, 2, 8
OFFICIAL_GLOBAL_SHAPES = {
    "pos_embed": (1, 256, D),
    "x_embedder.proj.weight": (D, 4, P, P),
    "x_embedder.proj.bias": (D,),
    "t_embedder.mlp.0.weight": (D, 256),
    "t_embedder.mlp.0.bias": (D,),
    "t_embedder.mlp.2.weight": (D, D),
    "t_embedder.mlp.2.bias": (D,),
    "y_embedder.embedding_table.weight": (1001, D),
    "final_layer.linear.weight": (P * P * C_OUT, D),
    "final_layer.linear.bias": (P * P * C_OUT,),
    "final_layer.adaLN_modulation.1.weight": (2 * D, D),
    "final_layer.adaLN_modulation.1.bias": (2 * D,),
}
OFFICIAL_BLOCK_SHAPES = {
    "attn.qkv.weight": (3 * D, D),
    "attn.qkv.bias": (3 * D,),
    "attn.proj.weight": (D, D),
    "attn.proj.bias": (D,),
    "mlp.fc1.weight": (4 * D, D),
    "mlp.fc1.bias": (4 * D,),
    "mlp.fc2.weight": (D, 4 * D),
    "mlp.fc2.bias": (D,),
    "adaLN_modulation.1.weight": (6 * D, D),
    "adaLN_modulation.1.bias": (6 * D,),
}
OFFICIAL_DEPTH = 28
DIT_XL2_PARAMS = 675_129_632  # the figure the DiT repository reports for DiT-XL/2 at 256 px


def official_xl2_shapes() -> dict[str, tuple[int, ...]]:
    shapes = dict(OFFICIAL_GLOBAL_SHAPES)
    for i in range(OFFICIAL_DEPTH):
        shapes.update({f"blocks.{i}.{k}": v for k, v in OFFICIAL_BLOCK_SHAPES.items()})
    return shapes


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every trainable tensor random values, so that zero-initialised layers do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_dit(**overrides) -> DiT:
    kwargs = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10
    )
    return DiT(**{**kwargs, **overrides})


def inputs(model: DiT, n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, model.num_classes, (n,), generator=gen)
    return x, t, y


# ---- Official layout ------------------------------------------------------------------------


def test_pinned_official_table_matches_published_parameter_count():
    shapes = official_xl2_shapes()
    assert len(shapes) == 12 + 10 * 28 == 292
    assert sum(math.prod(s) for s in shapes.values()) == DIT_XL2_PARAMS


def test_dit_xl2_state_dict_equals_official_layout():
    with torch.device("meta"):
        model = create("DiT-XL/2")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_xl2_shapes()


def test_dit_xl2_parameter_count_675_129_632():
    with torch.device("meta"):
        model = create("DiT-XL/2")
    assert sum(p.numel() for p in model.parameters()) == DIT_XL2_PARAMS
    assert list(model.buffers()) == []


def test_dit_xl2_512_only_changes_pos_embed():
    with torch.device("meta"):
        model = create("DiT-XL/2", input_size=64)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_xl2_shapes()
    expected["pos_embed"] = (1, 1024, D)
    assert got == expected


# ---- Embedders --------------------------------------------------------------------------------


def test_sincos_pos_embed_column_half_first():
    # grid 2, D = 8 → ω = (1, 0.01). Token 1 is (row 0, col 1), token 2 is (row 1, col 0).
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 0, 0, 1, 1],
            [s1, s2, c1, c2, 0, 0, 1, 1],
            [0, 0, 1, 1, s1, s2, c1, c2],
            [s1, s2, c1, c2, s1, s2, c1, c2],
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(sincos_pos_embed_2d(8, 2), expected, rtol=0, atol=1e-7)


def test_sincos_pos_embed_matches_mae_recipe_numpy():
    # The MAE recipe: meshgrid(w, h), first half encodes grid[0] (the column), [sin | cos] per half.
    dim, grid = 32, 5
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    torch.testing.assert_close(
        sincos_pos_embed_2d(dim, grid), torch.from_numpy(ref).float(), rtol=0, atol=1e-6
    )


def test_pos_embed_is_frozen_parameter_in_state_dict():
    model = tiny_dit()
    assert "pos_embed" in dict(model.named_parameters())
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(64, 4))


def test_timestep_embedding_cos_then_sin():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 1.0]), 4)
    expected = torch.tensor([[1, 1, 0, 0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    torch.testing.assert_close(emb, expected.float())
    assert TimestepEmbedder.timestep_embedding(torch.tensor([3.0]), 5).shape == (1, 5)


def test_label_embedder_null_class_and_dropout():
    model = tiny_dit(class_dropout_prob=1.0)
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.tensor([1, 2, 3])
    null = emb.embedding_table.weight[10]
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[labels])
    torch.testing.assert_close(emb(labels, train=True), null.expand(3, -1))  # p = 1 drops all
    forced = emb(labels, train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(forced[1], null)
    torch.testing.assert_close(forced[[0, 2]], emb.embedding_table.weight[[1, 3]])
    assert tiny_dit(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


# ---- Blocks -----------------------------------------------------------------------------------


def test_attention_uses_official_qkv_row_layout():
    """Rows of qkv are [q | k | v], each split into heads of consecutive rows (timm layout)."""
    torch.manual_seed(0)
    dim, heads = 32, 4
    attn = Attention(dim, heads)
    x = torch.randn(2, 5, dim)
    w, b = attn.qkv.weight, attn.qkv.bias
    hd = dim // heads
    outs = []
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        q = x @ w[:dim][rows].T + b[:dim][rows]
        k = x @ w[dim : 2 * dim][rows].T + b[dim : 2 * dim][rows]
        v = x @ w[2 * dim :][rows].T + b[2 * dim :][rows]
        outs.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v)
    ref = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_unpatchify_matches_official_einsum():
    n, g, p, c = 2, 3, 2, 5
    x = torch.randn(n, g * g, p * p * c)
    ref = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, c)).reshape(n, c, g * p, g * p)
    assert torch.equal(unpatchify(x, p, c), ref)


def test_block_norms_and_mlp_match_official_choices():
    block = tiny_dit().blocks[0]
    assert not block.norm1.elementwise_affine and block.norm1.eps == 1e-6
    assert not block.norm2.elementwise_affine and block.norm2.eps == 1e-6
    assert block.mlp.act.approximate == "tanh"
    assert block.mlp.fc1.out_features == 4 * 64
    x = torch.randn(4, 64)
    torch.testing.assert_close(block.mlp.act(x), F.gelu(x, approximate="tanh"))


# ---- Initialisation ---------------------------------------------------------------------------


def test_initialisation_is_adaln_zero():
    model = tiny_dit()
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
        assert block.attn.qkv.weight.any() and not block.attn.qkv.bias.any()
    final = model.final_layer
    assert not final.linear.weight.any() and not final.adaLN_modulation[1].weight.any()
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    # Zeroed output layer: the untrained model predicts exactly zero.
    out = model(*inputs(model))
    assert torch.equal(out, torch.zeros_like(out))


# ---- Forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, out_channels",
    [
        ({}, 8),
        ({"learn_sigma": False}, 4),
        ({"patch_size": 4}, 8),
        ({"in_channels": 1, "input_size": 16, "patch_size": 4}, 2),
    ],
)
def test_forward_shape(overrides, out_channels):
    model = randomize_(tiny_dit(**overrides)).eval()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert model.out_channels == out_channels
    assert out.shape == (3, out_channels, model.input_size, model.input_size)
    assert torch.isfinite(out).all()


def test_forward_is_deterministic_and_batch_independent():
    model = randomize_(tiny_dit()).eval()
    x, t, y = inputs(model, n=4)
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t, y)
        one = model(x[2:3], t[2:3], y[2:3])
    assert torch.equal(a, b)
    assert a.abs().max() > 0
    torch.testing.assert_close(one, a[2:3], rtol=1e-5, atol=1e-6)


def test_forward_depends_on_t_and_y():
    model = randomize_(tiny_dit()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t + 1, y))
        assert not torch.allclose(base, model(x, t, (y + 1) % 10))


def test_backward_leaves_pos_embed_alone():
    model = randomize_(tiny_dit()).train()
    model(*inputs(model)).square().mean().backward()
    assert model.pos_embed.grad is None
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_bf16_forward_runs_close_to_fp32():
    model = randomize_(tiny_dit()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.05)


def test_wrong_input_size_is_a_clear_error():
    model = tiny_dit()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="input_size=8"):
        model(x[..., :6, :6], t, y)


@pytest.mark.parametrize(
    "overrides, match",
    [({"input_size": 9}, "not divisible by patch_size"), ({"num_heads": 5}, "not divisible by num_heads")],
)
def test_invalid_sizes_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_dit(**overrides)


def test_attributes_and_config():
    model = tiny_dit(learn_sigma=False)
    assert model.arch == "dit"
    assert (model.in_channels, model.out_channels, model.input_size, model.patch_size) == (4, 4, 8, 2)
    assert (model.num_classes, model.learn_sigma) == (10, False)
    assert model.config == dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=10,
        learn_sigma=False,
    )
