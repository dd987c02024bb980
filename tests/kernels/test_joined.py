"""Joined GEMMs (`ditq.kernels.joined`): the layers an adapter declares as reading one input hold one e4m3 weight,
compute in eager what they computed alone, become one GEMM under the fusion pass, and fall back together."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

import ditq
from ditq.adapters import adapter_for
from ditq.kernels import prepare_for_inference
from ditq.kernels.fp8 import fp8_gemm_rows, fp8_input_codes
from ditq.kernels.fusion import COUNTER
from ditq.kernels.joined import join_gemms
from ditq.models import create
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.kernels.compiled import assert_compiled_matches_eager, pre_grad_only

SPEC = QuantSpec(w_bits=4, a_bits=8, a_format="fp8")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Projections(torch.nn.Module):
    """q, k and v of x, and u of `other` (which is x unless given): q(x) + k(x)·v(x) + u(other)."""

    def __init__(self, bias: tuple[bool, ...] = (True, False, True, True)):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.u = (QuantLinear.from_linear(torch.nn.Linear(48, n, bias=b), SPEC)
                                          for n, b in zip((48, 32, 48, 48), bias, strict=True))  # fmt: skip

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        return self.q(x) + self.k(x).repeat(1, 1, 3)[..., :48] * self.v(x) + self.u(x if other is None else other)


def prepared(groups: list[tuple[str, ...]], **kwargs) -> Projections:
    model = prepare_for_inference(Projections(**kwargs).eval(), "fp8-cached")
    assert join_gemms(model, groups) == sum(map(len, groups))
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 40, 48, generator=g), torch.randn(2, 40, 48, generator=g)


def test_joined_layers_share_one_weight_and_compute_in_eager_exactly_what_they_did_alone():
    alone = prepare_for_inference(Projections().eval(), "fp8-cached")
    model = prepared([("q", "k", "v")])
    first = model.q
    assert model.k.gemm_group == (model.q, model.k, model.v) and model.k.gemm_rows == (48, 80)
    assert first.weight_fp8.shape == (128, 48) and not hasattr(model.k, "weight_fp8")
    assert torch.equal(first.weight_fp8.view(torch.uint8)[48:80], alone.k.weight_fp8.view(torch.uint8))
    assert torch.equal(first.joined_bias[48:80], torch.zeros(32))  # k has no bias: zeros in its rows
    x, _ = inputs()
    with torch.no_grad():
        for name in "qkv":  # the same GEMM on the same rows
            assert torch.equal(getattr(model, name)(x), getattr(alone, name)(x))


def test_the_pass_runs_one_gemm_for_the_layers_that_read_one_input():
    model = prepared([("q", "k", "v", "u")])
    x, other = inputs()
    for args, joined in (((x,), 4), ((x, other), 3)):  # u reading another input leaves q, k, v joined
        counters[COUNTER].clear()
        assert_compiled_matches_eager(model, *args, backend=pre_grad_only)
        assert counters[COUNTER]["joined_gemm"] == joined


def test_rows_with_a_gap_stay_separate_gemms():
    """q and v read x, k (between them) reads another input: q and v's rows are not adjacent."""

    class Gap(Projections):
        def forward(self, x, other):
            return self.q(x) + self.k(other).repeat(1, 1, 3)[..., :48] * self.v(x)

    model = prepare_for_inference(Gap().eval(), "fp8-cached")
    join_gemms(model, [("q", "k", "v")])
    counters[COUNTER].clear()
    assert_compiled_matches_eager(model, *inputs(), backend=pre_grad_only)
    assert counters[COUNTER]["joined_gemm"] == 0


class Viewed(Projections):
    """q, k and v whose outputs are read as `read` says: a view merging tokens and channels (it needs each output's
    own contiguous rows), split heads (any row stride), or as the graph's outputs."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.read == "outputs":
            return q, k, v
        if self.read == "flattened":
            return q.view(x.shape[0], -1).sum(1) + k.view(x.shape[0], -1).sum(1) + v.view(x.shape[0], -1).sum(1)
        heads = [t.view(*t.shape[:-1], 2, -1).transpose(1, 2) for t in (q, k, v)]  # (N, 2, T, D)
        return heads[0].sum(-1) + heads[1].sum(-1) + heads[2].sum(-1)


@pytest.mark.parametrize(("read", "joined"), [("heads", 3), ("flattened", 0), ("outputs", 0)])
def test_calls_whose_readers_need_their_own_strides_stay_apart(read, joined):
    """A joined GEMM's columns are rows strided by the whole output: where a reader's view cannot take that, or
    the graph would return it, the calls stay apart."""
    model = prepare_for_inference(Viewed(read).eval(), "fp8-cached")
    join_gemms(model, [("q", "k", "v")])
    counters[COUNTER].clear()
    x, other = inputs()
    if read == "outputs":
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, backend=pre_grad_only)(x, other)
        assert all(t.is_contiguous() for t in compiled)
    else:
        assert_compiled_matches_eager(model, x, other, backend=pre_grad_only)
    assert counters[COUNTER]["joined_gemm"] == joined


def test_layers_that_cannot_share_a_gemm_are_not_joined():
    model = prepare_for_inference(Projections().eval(), "fp8-cached")
    model.k.fast_accumulation = not model.q.fast_accumulation
    assert join_gemms(model, [("q", "k")]) == 0
    smoothed = Projections()
    smoothed.v = QuantLinear.from_linear(torch.nn.Linear(48, 48), dataclasses.replace(SPEC, smooth=True),
                                         smooth=torch.rand(48) + 0.5)  # fmt: skip
    prepare_for_inference(smoothed.eval(), "fp8-cached")
    assert join_gemms(smoothed, [("q", "v")]) == 0  # v quantizes x / smooth: other codes
    assert join_gemms(prepare_for_inference(Projections().eval(), "fp8"), [("q", "k")]) == 0  # no cached weight


def test_new_codes_or_another_backend_drop_the_whole_group():
    model = prepared([("q", "k", "v")])
    model.v.set_codes(model.v.weight_codes(), model.v.scales.clone())
    assert all(m.gemm_group is None and m.backend == "reference" for m in (model.q, model.k, model.v))
    assert not hasattr(model.q, "joined_bias") and model.u.backend == "fp8-cached"
    prepare_for_inference(model, "fp8-cached")  # a generic model: no declared groups
    assert model.q.gemm_group is None and model.q.weight_fp8.shape == (48, 48)


def test_loading_tensors_into_any_layer_of_a_group_drops_the_group():
    model = prepared([("q", "k", "v")])
    with pytest.warns(UserWarning, match="runs the reference backend"):
        model.k.load_state_dict(model.k.state_dict())  # k holds none of the joined buffers itself
    assert all(m.gemm_group is None and m.backend == "reference" for m in (model.q, model.k, model.v))


def test_in_bf16_on_the_device_a_joined_layer_computes_what_it_computed_alone_and_the_joined_gemm_agrees():
    """On a GPU this is cuBLAS reading a group's rows at an offset into the joined weight, scales and bias. The one
    GEMM over all rows may take another cuBLAS kernel (another order of the float32 partial sums): its columns are
    then within the output's bf16 rounding (2⁻⁸ relative) of each layer's own, twice for margin."""
    alone = prepare_for_inference(Projections().to(DEVICE).eval(), "fp8-cached").to(torch.bfloat16)
    model = prepare_for_inference(Projections().to(DEVICE).eval(), "fp8-cached")
    join_gemms(model, [("q", "k", "v")])
    model.to(torch.bfloat16)
    first = model.q
    assert first.weight_fp8.dtype == torch.float8_e4m3fn and first.joined_bias.dtype == torch.bfloat16
    x = inputs()[0].to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        for name in "qkv":
            assert torch.equal(getattr(model, name)(x), getattr(alone, name)(x)), name
        codes, scale_x = fp8_input_codes(x, None)
        joined = fp8_gemm_rows(codes, scale_x, first.weight_fp8, first.fp8_scale_w, first.joined_bias, 0, 128,
                               first.fast_accumulation, torch.bfloat16)  # fmt: skip
        for name in "qkv":
            start, stop = getattr(model, name).gemm_rows
            own = getattr(model, name)(x).reshape(-1, stop - start)
            torch.testing.assert_close(joined[:, start:stop], own, rtol=2**-7, atol=2**-7 * own.abs().max().item())


def test_a_deep_copy_joins_its_own_layers():
    model = copy.deepcopy(prepared([("q", "k", "v")]))
    assert model.k.gemm_group[0] is model.q


def test_preparing_a_large_dit_joins_each_blocks_swiglu_inputs_unless_told_not_to():
    model = create("LargeDiT-MNIST", depth=2, hidden_size=64, num_heads=2).eval()
    prepare_for_inference(ditq.quantize(model, ditq.RTN(w_bits=4, a_bits=8, a_format="fp8")), "fp8-cached")
    for block in model.blocks:
        assert block.mlp.w3.gemm_group == (block.mlp.w1, block.mlp.w3)
    prepare_for_inference(model, "fp8-cached", join=False)
    assert all(block.mlp.w3.gemm_group is None and hasattr(block.mlp.w3, "weight_fp8") for block in model.blocks)
    with pytest.raises(TypeError, match="join must be True or False, got 'no'"):
        prepare_for_inference(model, "fp8-cached", join="no")


@pytest.mark.parametrize("class_name", ["DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                                        "FluxTransformer2DModel"])  # fmt: skip
def test_a_diffusers_adapters_declared_groups_read_one_input_when_traced(class_name):
    """Each declared group is among the layers a traced call finds reading one tensor (PixArt's cross-attentions
    all read the caption: every block's k and v are one traced group, declared per block)."""
    pytest.importorskip("diffusers")
    from tests.integrations.tiny_diffusers import make_transformer

    model = make_transformer(class_name)
    adapter = adapter_for(model)
    declared, traced = adapter.gemm_groups(model), [set(g) for g in adapter.input_groups(model)]
    assert declared and Counter(len(g) for g in declared) == Counter(
        {"DiTTransformer2DModel": {3: 2}, "PixArtTransformer2DModel": {3: 2, 2: 2}, "SD3Transformer2DModel": {3: 4},
         "FluxTransformer2DModel": {3: 2, 4: 2}}[class_name])  # fmt: skip
    assert all(any(set(group) <= t for t in traced) for group in declared)
