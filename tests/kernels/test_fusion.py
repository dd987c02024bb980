"""The fusion pass (`ditq.kernels.fusion`): on each model, how many producers it folds into FP8 input pre-passes
(counted from the model's block structure), and the compiled model's outputs against eager's.

Every compiled run here but one uses `pre_grad_only` (Dynamo's graph after the pass, run as it is): the pass's
rewrite in seconds; one test compiles the zoo DiT whole with inductor."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

import ditq
from ditq.kernels import prepare_for_inference
from ditq.kernels.fusion import COUNTER, FusionPass, fold_fp8_inputs
from ditq.models import create
from ditq.models.dit import DiTBlock
from ditq.quant.primitives import fp8_cast, fp8_scale
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.kernels.compiled import assert_compiled_matches_eager, pre_grad_only
from tests.tiny import make_tiny_dit

FP8 = ditq.RTN(w_bits=4, a_bits=8, a_format="fp8")
SPEC = QuantSpec(w_bits=4, a_bits=8, a_format="fp8")


def folded(model: torch.nn.Module, *args, backend="pre_grad_only") -> Counter:
    """What the pass folded compiling `model` (compiled against eager on the way)."""
    counters[COUNTER].clear()
    assert_compiled_matches_eager(model, *args, backend=pre_grad_only if backend == "pre_grad_only" else backend)
    return +counters[COUNTER]


def dit_inputs(samples: int = 9):
    """9 samples of 16 tokens: more rows than "fp8" hands to the lowbit kernel."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(samples, 1, 8, 8, generator=g), torch.randint(0, 1000, (samples,), generator=g),
            torch.randint(0, 10, (samples,), generator=g))  # fmt: skip


def test_the_zoo_dit_compiled_whole_by_inductor_folds_every_block_producer():
    """Per block: norm1 + modulate into qkv, norm2 + modulate into fc1 with the attention's gated residual add,
    the GELU into fc2, the attention output into proj; the MLP's residual add rides in the next block's qkv."""
    depth = 2
    model = make_tiny_dit(depth=depth)
    prepare_for_inference(ditq.quantize(model, FP8), "fp8-cached")
    assert folded(model, *dit_inputs(), backend="inductor") == Counter(
        norm_modulate=2 * depth, residual=2 * depth - 1, gelu=depth, attention=depth)  # fmt: skip


def test_a_block_with_smoothing_and_low_rank_branches_folds_into_their_pre_pass_calls():
    """Layers with SVDQuant's branch call the pre-pass themselves: the pass folds the producers into those calls
    (the attention's projection already reads its input in one pre-pass)."""
    torch.manual_seed(0)
    block = DiTBlock(48, 4, mlp_ratio=2.0)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
        lin = getattr(parent, name)
        k, n = lin.in_features, lin.out_features
        extras = dict(smooth=torch.rand(k) + 0.5, lowrank_down=torch.randn(k, 4) * 0.1, lowrank_up=torch.randn(4, n) * 0.1)
        setattr(parent, name, QuantLinear.from_linear(lin, dataclasses.replace(SPEC, smooth=True, rank=4), **extras))
    prepare_for_inference(block.eval(), "fp8")
    x = torch.randn(3, 50, 48, generator=torch.Generator().manual_seed(1))  # > LOWBIT_MAX_ROWS rows
    c = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    assert folded(block, x, c) == Counter(norm_modulate=2, residual=1, gelu=1)


def test_few_rows_on_the_fp8_backend_keep_the_lowbit_route_and_nothing_is_folded():
    model = make_tiny_dit(depth=1)
    prepare_for_inference(ditq.quantize(model, FP8), "fp8")
    args = dit_inputs(samples=2)  # 32 rows: the lowbit kernel
    counters[COUNTER].clear()
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=pre_grad_only)(*args)
        torch.testing.assert_close(compiled, model(*args), rtol=0, atol=0)  # the same ops in the same order
    assert not +counters[COUNTER]


# ---- diffusers transformers ---------------------------------------------------------------------------------

# (config changes, expected folds), from each architecture's blocks (L double-stream or DiT blocks):
# - DiT (ada_norm_zero): norm1 → to_q/k/v (one pre-pass, two deduped), norm2 → ff.net.0.proj with the attention's
#   gated add, GELU → ff.net.2, attention output → to_out.0; the ff's gated add → next block's norm1;
# - PixArt (ada_norm_single): as DiT, plus a cross-attention whose to_q reads the gated residual sum (no norm:
#   sum, the pre-pass writes it), whose to_k/to_v read the caption (plain once, deduped in every later layer) and
#   whose output → to_out.0; norm2's residual add is the cross-attention's, without a gate;
# - SD3 (joint blocks, the last one context_pre_only): both streams as DiT's, the last block's context stream
#   ending at add_q/k/v (an AdaLayerNormContinuous: `(1 + scale)[:, None, :]`); the joint attention's outputs
#   are token slices of two samples' rows (not contiguous): plain (one sample's: attention outputs);
# - FLUX: a double block as SD3's first; a single block's norm → proj_mlp, to_q/k/v (one pre-pass, three
#   deduped), its proj_out reads cat([attention, GELU(proj_mlp)]) (concat: one pre-pass reads both), and its norm
#   reads cat([text, image]) tokens (token_concat: the pre-pass reads both, no residual).
# Each attention's q, k and v (a cross-attention's k and v, a joint attention's added q, k and v, FLUX's single
# blocks' proj_mlp with them) are one GEMM: `joined_gemm` counts the layers.
L = 2
DIFFUSERS = {
    "DiTTransformer2DModel": ({}, dict(norm_modulate=2 * L, deduped=2 * L, gelu=L, attention=L, residual=2 * L - 1,
                                       joined_gemm=3 * L)),
    "PixArtTransformer2DModel": ({}, dict(norm_modulate=2 * L, deduped=2 * L + 2 * L - 1, attention=2 * L, plain=1,
                                          sum=L, gelu=L, residual=L + L - 1 + L, joined_gemm=(3 + 2) * L)),
    "SD3Transformer2DModel": ({}, dict(norm_modulate=2 * L + L + L - 1, deduped=4 * L, gelu=2 * L - 1,
                                       residual=2 * L - 1 + 2 * (L - 1), plain=2 * L - 1, joined_gemm=6 * L)),
    "FluxTransformer2DModel": (dict(num_layers=1, num_single_layers=1), dict(norm_modulate=4 + 1, deduped=4 + 3,
                                                                             gelu=2, residual=2, plain=2, concat=1,
                                                                             token_concat=1, joined_gemm=6 + 4)),
}  # fmt: skip


def diffusers_folds(class_name: str, samples: int) -> Counter:
    """What the pass folds compiling the tiny `class_name` (DIFFUSERS' config changes) on `samples` samples."""
    pytest.importorskip("diffusers")
    from ditq.integrations.diffusers import SUPPORTED
    from tests.integrations.tiny_diffusers import make_transformer

    model = make_transformer(class_name, **DIFFUSERS[class_name][0])
    prepare_for_inference(ditq.quantize(model, FP8), "fp8-cached")
    inputs = SUPPORTED[class_name].example_inputs(model, samples, 8, 7, 0.5, torch.Generator().manual_seed(1))

    class Positional(torch.nn.Module):  # `folded` passes positional arguments
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *values):
            return self.model(**dict(zip(inputs, values, strict=True)), return_dict=False)[0]

    return folded(Positional(), *inputs.values())


@pytest.mark.parametrize("class_name", list(DIFFUSERS))
def test_a_diffusers_transformer_folds_what_its_blocks_imply(class_name):
    assert diffusers_folds(class_name, 2) == Counter(DIFFUSERS[class_name][1])


@pytest.mark.parametrize(("class_name", "slices"), [("FluxTransformer2DModel", 2), ("SD3Transformer2DModel", 3)])
def test_one_samples_joint_attention_outputs_are_folded_as_attention_outputs(class_name, slices):
    """A joint attention's text and image tokens of one sample are contiguous rows: its outputs' slices go through
    the pre-pass (of several samples they are strided, and stay plain)."""
    expected = Counter(DIFFUSERS[class_name][1])
    assert expected["plain"] == slices
    expected["plain"] -= slices
    expected["attention"] += slices
    assert diffusers_folds(class_name, 1) == +expected


# ---- what is not folded -------------------------------------------------------------------------------------


class Modulated(torch.nn.Module):
    """modulate(LayerNorm(x + gate·update)) into q, k and v (three FP8 layers reading one input), written the way
    `variant` says."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.norm = torch.nn.LayerNorm(48, elementwise_affine=variant == "affine", eps=1e-6)
        self.q, self.k, self.v = (QuantLinear.from_linear(torch.nn.Linear(48, 48), SPEC) for _ in "qkv")

    def forward(self, x: torch.Tensor, update: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = c.chunk(3, dim=1)  # 3 × (N, D)
        if self.variant == "chunked":  # (N, 1, D) chunks, `scale + 1`, the gate on the right
            shift, scale, gate = c[:, None].chunk(3, dim=2)
            x = x + update * gate
            h = self.norm(x) * (scale + 1) + shift
        elif self.variant == "shared_shift":  # one shift for every sample: not per sample
            x = x + gate[:, None] * update
            h = self.norm(x) * (1 + scale[:, None]) + shift[:1, None]
        elif self.variant == "full_gate":  # a gate per token: the product stays an op, the add is folded
            x = x + gate[:, None] * update * update.sign()
            h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        elif self.variant == "in_place":  # x written in place after its norm: nothing may move its read
            x = x.clone()
            h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
            x.mul_(2)
        else:  # "affine": a LayerNorm with weights
            x = x + gate[:, None] * update
            h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return self.q(h) + self.k(h) * self.v(h) + x


def modulated_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, update (3 samples of 50 tokens, 48 channels) and the condition (shift, scale, gate) of `Modulated`."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 50, 48, generator=g), torch.randn(3, 50, 48, generator=g), torch.randn(3, 144, generator=g)


@pytest.mark.parametrize(("variant", "expected"), [
    ("chunked", dict(norm_modulate=1, residual=1, deduped=2)),
    ("shared_shift", dict(plain=1, deduped=2)),
    ("full_gate", dict(norm_modulate=1, residual=1, deduped=2)),
    ("in_place", dict(plain=1, deduped=2)),
    ("affine", dict(norm_modulate=1, residual=1, deduped=2)),
])  # fmt: skip
def test_a_modulate_is_folded_with_per_sample_shift_and_scale_only(variant, expected):
    model = prepare_for_inference(Modulated(variant).eval(), "fp8-cached")
    assert folded(model, *modulated_inputs()) == Counter(expected)


class Normalized(torch.nn.Module):
    """norm(x + update) into q, k and v, or SiLU(x) into them, with `norm` one of `NORMS`' modules."""

    def __init__(self, norm: str):
        super().__init__()
        self.norm = NORMS[norm]()
        self.q, self.k, self.v = (QuantLinear.from_linear(torch.nn.Linear(48, 48), SPEC) for _ in "qkv")
        with torch.no_grad():
            for p in self.norm.parameters():
                p.normal_(1.0, 0.5)

    def forward(self, x: torch.Tensor, update: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.silu(x) if isinstance(self.norm, torch.nn.SiLU) else self.norm(x + update)
        return self.q(h) + self.k(h) * self.v(h)


def diffusers_rms_norm(**kwargs) -> torch.nn.Module:
    pytest.importorskip("diffusers")
    from diffusers.models.normalization import RMSNorm

    return RMSNorm(48, eps=1e-6, **kwargs)


NORMS = {
    "layer_norm_affine": lambda: torch.nn.LayerNorm(48, eps=1e-6),
    "rms_norm": lambda: torch.nn.RMSNorm(48, eps=1e-6),
    "diffusers_rms_norm": lambda: diffusers_rms_norm(bias=True),
    "diffusers_rms_norm_without_weight": lambda: diffusers_rms_norm(elementwise_affine=False),
    "silu": torch.nn.SiLU,
}


@pytest.mark.parametrize("norm", list(NORMS))
def test_a_norm_without_a_modulate_and_silu_are_folded(norm):
    model = prepare_for_inference(Normalized(norm).eval(), "fp8-cached")
    folded_kind = dict(silu=1) if norm == "silu" else dict(norm=1, residual=1)
    assert folded(model, *modulated_inputs()) == Counter(deduped=2, **folded_kind)


class Summed(torch.nn.Module):
    """q reads x + gate·update as it is (PixArt's cross-attention query); the sum is the residual stream after it,
    or (`read_after` False) only q reads it."""

    def __init__(self, gated: bool, read_after: bool):
        super().__init__()
        self.gated, self.read_after = gated, read_after
        self.q = QuantLinear.from_linear(torch.nn.Linear(48, 48), SPEC)

    def forward(self, x: torch.Tensor, update: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gate = c[:, None, :48]  # (N, 1, K)
        h = x + gate * update if self.gated else update + x
        return h + self.q(h) if self.read_after else self.q(h)


@pytest.mark.parametrize(("gated", "read_after", "expected"), [
    (True, True, dict(sum=1, residual=1)), (False, True, dict(sum=1, residual=1)), (True, False, dict(plain=1)),
])  # fmt: skip
def test_a_residual_sum_read_as_it_is_is_folded_where_the_stream_reads_it_after(gated, read_after, expected):
    model = prepare_for_inference(Summed(gated, read_after).eval(), "fp8-cached")
    assert folded(model, *modulated_inputs()) == Counter(expected)


class Concatenated(torch.nn.Module):
    """out(cat([a, act(mlp(x))], dim)) as FLUX's single block writes it, or a variant the pre-pass cannot read."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.mlp = torch.nn.Linear(48, 80)
        self.out = QuantLinear.from_linear(torch.nn.Linear(48 + 80, 48), SPEC)

    def forward(self, x: torch.Tensor, a: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        if self.variant == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.variant == "silu":
            h = F.silu(h)
        elif self.variant == "three_parts":
            return self.out(torch.cat([a[..., :24], a[..., 24:], h], dim=-1))
        elif self.variant == "other_dim":
            u = torch.cat([a, h], dim=-1)
            return self.out(torch.cat([u[:, :25], u[:, 25:]], dim=1))  # tokens, not channels
        elif self.variant == "keywords":
            return self.out(torch.cat(tensors=[a, F.gelu(h)], dim=-1))
        elif self.variant == "written_in_place":  # the concatenation changed after it was made: nothing may skip it
            u = torch.cat([a, F.gelu(h)], dim=-1)
            u.abs_()
            return self.out(u)
        return self.out(torch.cat([a, h], dim=2))


@pytest.mark.parametrize(("variant", "expected"), [
    ("gelu_tanh", dict(concat=1)), ("silu", dict(concat=1)), ("none", dict(concat=1)),
    ("three_parts", dict(plain=1)), ("other_dim", dict(plain=1)), ("keywords", dict(concat=1)),
    ("written_in_place", dict(plain=1)),
])  # fmt: skip
def test_a_concatenation_of_two_parts_is_folded_with_the_second_parts_activation(variant, expected):
    model = prepare_for_inference(Concatenated(variant).eval(), "fp8-cached")
    assert folded(model, *modulated_inputs()) == Counter(expected)


class TokensJoined(torch.nn.Module):
    """q/k/v of modulate(LayerNorm(cat([text, image], 1))), the block's residual the concatenation itself (as FLUX's
    single blocks); "added": the norm reads cat(...) + update, whose sum the pre-pass writes (the tokens stay
    concatenated); "written_in_place": the concatenation changed in place before the norm; "empty_first": a part
    of no tokens (nothing to split)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant, self.first = variant, 0 if variant == "empty_first" else 7
        self.norm = torch.nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
        self.q, self.k, self.v = (QuantLinear.from_linear(torch.nn.Linear(48, 48), SPEC) for _ in "qkv")

    def forward(self, image: torch.Tensor, update: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, _ = c.chunk(3, dim=1)
        x = torch.cat([image[:, : self.first], image[:, self.first :]], dim=1)
        if self.variant == "added":
            x = x + update
        elif self.variant == "written_in_place":
            x.abs_()
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        return self.q(h) + self.k(h) * self.v(h) + x


@pytest.mark.parametrize(("variant", "expected"), [
    ("plain", dict(norm_modulate=1, token_concat=1, deduped=2)),
    ("added", dict(norm_modulate=1, residual=1, deduped=2)),
    ("written_in_place", dict(plain=1, deduped=2)),
    ("empty_first", dict(norm_modulate=1, deduped=2)),
])  # fmt: skip
def test_a_norm_of_concatenated_tokens_reads_both_parts(variant, expected):
    model = prepare_for_inference(TokensJoined(variant).eval(), "fp8-cached")
    assert folded(model, *modulated_inputs()) == Counter(expected)


def test_an_activation_written_in_place_before_its_layer_is_not_folded():
    class Activated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = QuantLinear.from_linear(torch.nn.Linear(48, 48), SPEC)

        def forward(self, x: torch.Tensor, update: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            h = F.gelu(x)
            h.abs_()  # the GELU's output is not what the layer reads
            return self.lin(h)

    model = prepare_for_inference(Activated().eval(), "fp8-cached")
    assert folded(model, *modulated_inputs()) == Counter(plain=1)


def test_a_large_dit_folds_its_rms_norms_and_modulates():
    """Per block: RMSNorm + modulate → qkv and → the SwiGLU's w1 and w3 (one pre-pass, one GEMM), the attention
    output → proj, w2 reads SiLU(w1·x) ⊙ w3·x (plain); the gated adds as the DiT's."""
    depth = 2
    torch.manual_seed(0)
    model = create("LargeDiT-MNIST", depth=depth, hidden_size=64, num_heads=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prepare_for_inference(ditq.quantize(model, FP8), "fp8-cached")
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(3, 1, 32, 32, generator=g), torch.randint(0, 1000, (3,), generator=g),
            torch.randint(0, 10, (3,), generator=g))  # fmt: skip
    assert folded(model, *args) == Counter(norm_modulate=2 * depth, deduped=depth, attention=depth, plain=depth,
                                           residual=2 * depth - 1, joined_gemm=2 * depth)  # fmt: skip


@pytest.mark.parametrize("lowrank", [False, True], ids=["smooth", "smooth+lowrank"])
def test_layers_of_an_input_group_share_their_input_buffers_and_quantize_their_input_once(lowrank):
    """Equal smoothing vectors (and low-rank down-projections, whose layers call the pre-pass themselves) held by
    layers become one tensor each, so Dynamo gives the graph one input for them and their pre-passes are one; a
    layer smoothing otherwise keeps its own."""
    model = Modulated("chunked")
    smooth, down = torch.rand(48) + 0.5, torch.randn(48, 4) * 0.1
    spec = dataclasses.replace(SPEC, smooth=True, rank=4 if lowrank else 0)
    for name, s in (("q", smooth), ("k", smooth.clone()), ("v", smooth + 1)):
        extras = dict(lowrank_down=down.clone(), lowrank_up=torch.randn(4, 48) * 0.1) if lowrank else {}
        setattr(model, name, QuantLinear.from_linear(torch.nn.Linear(48, 48), spec, smooth=s, **extras))
    prepare_for_inference(model.eval(), "fp8-cached")
    shared = ("inv_smooth", "lowrank_down_fp8", "lowrank_down_scale") if lowrank else ("inv_smooth",)
    assert all(getattr(model.q, b) is getattr(model.k, b) for b in shared)
    assert model.v.inv_smooth is not model.q.inv_smooth
    x, update, c = modulated_inputs()
    counters[COUNTER].clear()
    assert_compiled_matches_eager(model, x, update, c, backend=pre_grad_only)
    # v's pre-pass reads the sum the first one wrote
    assert +counters[COUNTER] == Counter(norm_modulate=2, residual=1, deduped=1)


def captured_graph(model: torch.nn.Module, *args) -> torch.fx.GraphModule:
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)(*args)
    return graphs[0]


@pytest.mark.parametrize("backend", [None, "reference", "dequantized", "lowbit"])
def test_the_pass_leaves_graphs_without_fp8_inputs_alone(backend):
    model = Modulated("chunked").eval()
    if backend is None:  # no ditq op at all
        model.q, model.k, model.v = (torch.nn.Linear(48, 48) for _ in "qkv")
    else:
        prepare_for_inference(model, backend)
    gm = captured_graph(model, *modulated_inputs())
    before = str(gm.graph)
    counters[COUNTER].clear()
    fold_fp8_inputs(gm.graph)
    assert str(gm.graph) == before and not +counters[COUNTER]


def test_the_pass_run_again_changes_nothing():
    model = prepare_for_inference(Modulated("chunked").eval(), "fp8-cached")
    gm = captured_graph(model, *modulated_inputs())
    fold_fp8_inputs(gm.graph)
    once = str(gm.graph)
    counters[COUNTER].clear()
    fold_fp8_inputs(gm.graph)
    assert str(gm.graph) == once and not +counters[COUNTER]


class Marking:
    """A user's own pre-grad pass, which records that it ran."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph):
        self.graphs += 1


def test_preparing_for_an_fp8_backend_installs_the_pass_once_after_a_users_own():
    user = Marking()
    with inductor_config.patch(pre_grad_custom_pass=user):
        prepare_for_inference(Modulated("chunked"), "reference")
        assert inductor_config.pre_grad_custom_pass is user  # not an FP8 backend
        for backend in ("fp8", "fp8-cached"):
            prepare_for_inference(Modulated("chunked"), backend)
            installed = inductor_config.pre_grad_custom_pass
            assert type(installed) is FusionPass and installed.previous is user
        assert installed.uuid() is None  # the user's pass has no uuid: inductor must not cache
        installed(torch.fx.Graph())
        assert user.graphs == 1
    with inductor_config.patch(pre_grad_custom_pass=None):
        prepare_for_inference(Modulated("chunked"), "fp8")
        assert type(inductor_config.pre_grad_custom_pass) is FusionPass and inductor_config.pre_grad_custom_pass.uuid()


def test_the_input_marker_computes_the_plain_codes_in_eager():
    x = torch.randn(140, 48, generator=torch.Generator().manual_seed(0))
    inv_smooth = torch.rand(48, generator=torch.Generator().manual_seed(1)) + 0.5
    codes, scales = torch.ops.ditq.fp8_input_codes(x.view(2, 70, 48), inv_smooth)
    h = x * inv_smooth
    assert torch.equal(scales, fp8_scale(h)) and torch.equal(codes.float(), fp8_cast(h, fp8_scale(h)).float())


def test_a_pixart_block_compiled_alone_reads_the_caption_input_in_one_pre_pass():
    """Compiled block by block (as diffusers' regional compilation does), a PixArt block's caption is an input of
    its graph: its cross-attention's k and v read it through one pre-pass (`input`), not inductor's absmax and cast
    kernels. The query reads the gated residual sum (`sum`), and each projection group is one GEMM."""
    pytest.importorskip("diffusers")
    from ditq.integrations.diffusers import SUPPORTED
    from tests.integrations.tiny_diffusers import make_transformer

    model = make_transformer("PixArtTransformer2DModel")
    prepare_for_inference(ditq.quantize(model, FP8), "fp8-cached")
    inputs = SUPPORTED["PixArtTransformer2DModel"].example_inputs(model, 2, 8, 7, 0.5, torch.Generator().manual_seed(1))
    captured = {}
    block = model.transformer_blocks[1]
    hook = block.register_forward_pre_hook(lambda _, args, kwargs: captured.update(args=args, kwargs=kwargs),
                                           with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    names = [n for n, v in captured["kwargs"].items() if isinstance(v, torch.Tensor)]

    class Block(torch.nn.Module):  # `folded` passes positional tensors
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, *tensors):
            return self.block(*captured["args"], **captured["kwargs"] | dict(zip(names, tensors, strict=True)))

    assert folded(Block(), *(captured["kwargs"][n] for n in names)) == Counter(
        norm_modulate=2, deduped=3, attention=2, sum=1, residual=2, input=1, gelu=1, joined_gemm=5)  # fmt: skip
