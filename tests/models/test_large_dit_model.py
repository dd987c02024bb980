"""Large-DiT: LLaMA-style blocks, TerDiT's adaLN RMSNorm, sizes of the 600M and 4.2B configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ditq.models import LargeDiT, create
from ditq.models.large_dit import swiglu_hidden_size


def tiny_large_dit(**overrides) -> LargeDiT:
    kwargs = dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        multiple_of=32,
    )
    return LargeDiT(**{**kwargs, **overrides})


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def inputs(model: LargeDiT, n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, model.num_classes, (n,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("dim, multiple_of, expected", [(1536, 256, 4096), (3072, 256, 8192), (256, 64, 704)])
def test_swiglu_hidden_size(dim, multiple_of, expected):
    assert swiglu_hidden_size(dim, 4.0, multiple_of) == expected


@pytest.mark.parametrize("adaln_norm", [False, True])
def test_adaln_norm_present_or_absent(adaln_norm):
    model = tiny_large_dit(adaln_norm=adaln_norm)
    keys = model.state_dict().keys()
    assert ("blocks.0.adaLN_modulation.2.weight" in keys) == adaln_norm
    assert ("blocks.1.adaLN_modulation.2.weight" in keys) == adaln_norm
    assert not any(k.startswith("final_layer.adaLN_modulation.2") for k in keys)  # final layer unchanged
    if adaln_norm:
        assert isinstance(model.blocks[0].adaLN_modulation[2], nn.RMSNorm)
        assert model.blocks[0].adaLN_modulation[2].weight.shape == (6 * 64,)


def test_adaln_norm_normalises_the_whole_modulation_vector():
    model = randomize_(tiny_large_dit(adaln_norm=True))
    with torch.no_grad():
        model.blocks[0].adaLN_modulation[2].weight.fill_(1.0)
        c = torch.randn(5, model.cond_size)
        mod = model.blocks[0].adaLN_modulation(c)  # (N, 6D)
    torch.testing.assert_close(mod.square().mean(dim=1).sqrt(), torch.ones(5), rtol=1e-3, atol=1e-3)


def test_layer_names_and_bias_free_linears():
    block = tiny_large_dit(qk_norm=True).blocks[0]
    for name in ("attn.qkv", "attn.proj", "mlp.w1", "mlp.w2", "mlp.w3"):
        linear = block.get_submodule(name)
        assert type(linear) is nn.Linear and linear.bias is None, name
    assert type(block.get_submodule("adaLN_modulation.1")) is nn.Linear
    assert block.adaLN_modulation[1].bias is not None
    assert isinstance(block.norm1, nn.RMSNorm) and isinstance(block.norm2, nn.RMSNorm)
    assert isinstance(block.attn.q_norm, nn.LayerNorm) and isinstance(block.attn.k_norm, nn.LayerNorm)


def test_qk_norm_off_adds_no_parameters():
    keys = tiny_large_dit(qk_norm=False).state_dict().keys()
    assert not any("q_norm" in k or "k_norm" in k for k in keys)


def test_condition_width_capped_at_1024():
    with torch.device("meta"):
        model = create("LargeDiT-4.2B")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["t_embedder.mlp.2.weight"] == (1024, 1024)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1024)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6 * 3072, 1024)
    assert shapes["blocks.0.mlp.w1.weight"] == (8192, 3072)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2 * 3072, 1024)
    assert shapes["final_layer.linear.weight"] == (32, 3072)
    assert len([k for k in shapes if k.endswith("attn.qkv.weight")]) == 32


@pytest.mark.parametrize("name, dim, depth", [("LargeDiT-600M", 1536, 16), ("LargeDiT-4.2B", 3072, 32)])
def test_block_parameter_count_matches_large_dit_arithmetic(name, dim, depth):
    # Research notes: per block 4·D² (attention) + 3·D·F (SwiGLU) + 1024·6D (adaLN), plus the
    # adaLN bias, two RMSNorm gains and TerDiT's 6D RMSNorm gain.
    ffn = {1536: 4096, 3072: 8192}[dim]
    per_block = 4 * dim * dim + 3 * dim * ffn + 1024 * 6 * dim + 6 * dim + 2 * dim + 6 * dim
    with torch.device("meta"):
        model = create(name)
    assert sum(p.numel() for p in model.blocks[0].parameters()) == per_block
    total = sum(p.numel() for p in model.parameters())
    assert depth * per_block < total < depth * per_block * 1.02


def test_initialisation_gives_zero_output():
    for adaln_norm in (False, True):
        model = tiny_large_dit(adaln_norm=adaln_norm)
        out = model(*inputs(model))
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("overrides", [{}, {"adaln_norm": True}, {"qk_norm": True}, {"learn_sigma": False}])
def test_forward_shape_and_determinism(overrides):
    model = randomize_(tiny_large_dit(**overrides)).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t, y)
    assert a.shape == (3, model.out_channels, 8, 8)
    assert model.out_channels == (4 if overrides.get("learn_sigma") is False else 8)
    assert torch.equal(a, b) and a.abs().max() > 0


def test_attributes_and_config():
    model = tiny_large_dit(adaln_norm=True)
    assert model.arch == "large_dit"
    assert (model.in_channels, model.out_channels, model.input_size, model.patch_size) == (4, 8, 8, 2)
    assert (model.num_classes, model.learn_sigma, model.cond_size) == (10, True, 64)
    assert model.config["adaln_norm"] is True and model.config["multiple_of"] == 32
    assert model.pos_embed.requires_grad is False
