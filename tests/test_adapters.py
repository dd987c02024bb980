from fnmatch import fnmatchcase

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ditq
from ditq.adapters import adapter_for, get_adapter, trace_input_groups
from ditq.api import plan
from ditq.models import LargeDiT, create
from ditq.quant.qlinear import QuantLinear
from tests.tiny import make_tiny_dit


class Block(nn.Module):
    """Pre-norm attention with separate q/k/v Linears, then a GELU MLP: the shape of a ViT block."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = (f(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.q, self.k, self.v))
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):  # (N, T, 16) -> (N, 10)
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def make_vit():
    torch.manual_seed(0)
    return TinyViT().eval()


def tiny_large_dit():
    torch.manual_seed(0)
    return create("LargeDiT-MNIST", depth=2, hidden_size=64, num_heads=2).eval()


def feed(x):
    return lambda model: model(x)


def test_adapter_for_picks_the_family_by_class():
    assert adapter_for(make_tiny_dit()).name == "dit"
    assert adapter_for(tiny_large_dit()).name == "large_dit"
    assert adapter_for(make_vit()).name == "generic"
    with pytest.raises(ValueError, match=r"unknown architecture 'unet'; known adapters are \[.*'dit'.*'generic'.*'large_dit'"):
        get_adapter("unet")


@pytest.mark.parametrize("make", [make_tiny_dit, tiny_large_dit])
def test_zoo_default_skips_each_match_their_model(make):
    model = make()
    adapter = adapter_for(model)
    names = [n for n, _ in model.named_modules()]
    for pattern in adapter.default_skip:
        assert any(fnmatchcase(n, pattern) for n in names), pattern
    quantized = sorted(plan(model, ditq.RTN()))
    assert quantized and all(".attn." in n or ".mlp." in n for n in quantized)


def test_zoo_config_rebuilds_the_skeleton_and_generic_cannot():
    model = tiny_large_dit()
    adapter = adapter_for(model)
    rebuilt = adapter.build(adapter.config(model))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert get_adapter("generic").config(make_vit()) is None
    with pytest.raises(ValueError, match="pass it as model="):
        get_adapter("generic").build({})


def test_generic_model_gets_no_dit_defaults():
    model = ditq.quantize(make_vit(), ditq.RTN(w_bits=8, a_bits=None))
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # embed and head too
    with pytest.raises(ValueError, match=r"skip pattern '\*adaLN_modulation\*' matches no module of TinyViT"):
        ditq.quantize(make_vit(), ditq.RTN(skip=("*adaLN_modulation*",)))


def test_generic_model_calibrates_with_run_and_quantizes_with_static_scales():
    x = torch.randn(4, 8, 16)
    fp = make_vit()
    calib = ditq.calibrate(fp, run=feed(x), rows_per_layer=32)
    assert len(calib.absmax) == 14 and calib.steps == 1 and calib.timesteps == ()
    model = ditq.quantize(make_vit(), ditq.RTN(w_bits=8, a_bits=8, a_dynamic=False), calib=calib)
    ref, out = fp(x), model(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert sqnr > 25, sqnr
    assert torch.allclose(model.head.act_scale, calib.absmax["head"].max() / 127)


def test_generic_model_without_run_is_refused():
    with pytest.raises(ValueError, match="pass run="):
        ditq.calibrate(make_vit())
    with pytest.raises(ValueError, match=r"\['n_samples', 'steps'\] set how ditq samples"):
        ditq.calibrate(make_tiny_dit(), n_samples=2, steps=2, run=feed(torch.randn(1)))


def test_generic_input_groups_are_traced():
    model = make_vit()
    groups = get_adapter("generic").input_groups(model, run=feed(torch.randn(2, 4, 16)))
    assert groups == [tuple(f"blocks.{i}.{n}" for n in "qkv") for i in (0, 1)]
    with pytest.raises(ValueError, match="needs run="):
        adapter_for(model).input_groups(model)


@pytest.mark.parametrize("make", [make_tiny_dit, tiny_large_dit])
def test_zoo_input_groups_read_equal_inputs(make):
    """Members of each declared group see the same values; tracing (same tensor) finds no other group."""
    model = make()
    groups = adapter_for(model).input_groups(model)
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].clone()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    run = feed_zoo(model.in_channels, model.input_size)
    with torch.no_grad():
        run(model)
    for h in hooks:
        h.remove()
    for group in groups:
        for name in group[1:]:
            assert torch.equal(seen[name], seen[group[0]]), (group[0], name)
    traced = trace_input_groups(model, run)
    assert set(traced) <= set(groups)
    if isinstance(model, LargeDiT):
        assert ("blocks.0.mlp.w1", "blocks.0.mlp.w3") in traced
    # a group that reads different inputs is caught: qkv and proj of one block do not
    assert not torch.equal(seen["blocks.0.attn.qkv"], seen["blocks.0.attn.proj"])


def feed_zoo(channels, size):
    x, t, y = torch.randn(2, channels, size, size), torch.tensor([5, 700]), torch.tensor([1, 3])
    return lambda model: model(x, t, y)


def test_requantized_generic_model_is_a_quantized_vit():
    fp = make_vit()
    q = ditq.api.requantize(fp, {"blocks.0.q": ditq.quant.spec.QuantSpec(w_bits=4, group_size=32)})
    assert isinstance(q.blocks[0].q, QuantLinear) and isinstance(fp.blocks[0].q, nn.Linear)
