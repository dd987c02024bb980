"""Compiled against eager (or any two computations of one model) for models that quantize activations between
float32 ops.

`torch.compile` computes the float32 ops (SiLU, LayerNorm, softmax, sums) with other kernels and summation
orders than eager, a few ulps apart, differently on each CPU. A quantizer is not continuous: where its scaled
input sits on a rounding midpoint, those ulps round it to the neighbouring code in one run only, and that one
step (× its weight column, through the rest of the network) is far above float32 rounding at the output (a
4-block DiT on one CPU: 7 of 1,152 outputs up to 5.4e-5 apart). So the two runs are compared in two parts:
- the codes: the compiled run records every quantizer's output; eager recomputes each on its own input (the
  compiled run's up to float32 rounding) and must land on the same grid points but at ties: one step away
  at most, and at few elements;
- the rest: eager goes on with the compiled run's codes, which leaves float32 rounding alone between them.
`assert_matches_with_shared_codes` compares any two runs so (SVDQuant's smoothing folded into the producers
against kept at run time, `tests/kernels/test_folding.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import get_custom_graph_passes

from ditq.kernels import fp8, reference
from ditq.kernels.triton import rowquant
from ditq.quant.primitives import compute_qparams, fp8_cast, fp8_scale, grouped

# A tie needs the scaled input within float32 rounding (~1e-6 relative) of a midpoint: ~1e-4 of the elements
# on int8's grid, less on e4m3's (16 points per binade). 1% leaves a wide margin and still catches a
# systematic difference (a bf16 rounding kept in one run only moves a few % of e4m3 codes).
MAX_TIE_FRACTION = 0.01


def assert_compiled_matches_eager(model: torch.nn.Module, *args, rtol: float = 1e-5, atol: float = 1e-5,
                                  backend: str | Callable = "inductor") -> int:  # fmt: skip
    """`torch.compile(model, fullgraph=True, backend=backend)(*args)` against `model(*args)`, both without
    autograd, for models whose activations are quantized by the FP8 backends or dynamic int fake quantization;
    returns how many codes differed (at ties). With the codes shared, rtol/atol bound float32 rounding of the
    unquantized ops (a few ulps each; 1e-5 is ~100)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    return assert_matches_with_shared_codes(lambda: compiled(*args), lambda: model(*args), rtol=rtol, atol=atol)


def assert_matches_with_shared_codes(
    first: Callable[[], torch.Tensor], second: Callable[[], torch.Tensor], *, rtol: float = 1e-5, atol: float = 1e-5
) -> int:
    """`second()` against `first()`, two computations of one function that quantize their activations (FP8
    pre-pass, dynamic int or FP8 fake quantization), both without autograd: the codes equal but at ties, and
    the outputs within rtol/atol with the first run's codes shared. Returns how many codes differed.

    A compiled first run may quantize an input once where the second quantizes it for each layer reading it (the
    fusion pass dedupes them), so each FP8 quantization of the second run is matched to a recorded one by its
    values. An FP8 input the fusion pass leaves to inductor's ops is sent through the pre-pass here, which
    computes the same codes, so that every one is recorded. Int and fake quantizations replay in call order."""
    fp8_tape: list[list] = []  # each FP8 quantization of the first run: [codes, scales, times the second matched it]
    int_tape: list = []  # each int quantizer call's output in the first run, in call order
    ties = []  # per replayed call, how many codes the second run rounded the other way
    rows_fp8, input_codes, activations = rowquant.quantize_rows_fp8, fp8.fp8_input_codes, reference.quantize_activations

    def record_rows(*a, **kw):
        codes, scales = rows_fp8(*a, **kw)
        fp8_tape.append([codes.clone(), scales.clone(), 0])
        return codes, scales

    def record_activations(h, spec, *rest):
        assert spec.a_dynamic, spec  # the grid `_grid_points` reads
        h_q = activations(h, spec, *rest)
        int_tape.append(h_q.clone())
        return h_q

    def recorded(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first run's quantization of the second's (codes, scales): equal scales, codes apart at ties only (of
        equal ones, the least matched: the first run may quantize one input twice too)."""
        nearest, matching = None, []
        for entry in fp8_tape:
            want_codes, want_scales = entry[0], entry[1]
            if want_codes.shape != codes.shape or not torch.allclose(scales, want_scales, rtol=rtol, atol=0):
                continue
            apart = (_e4m3_grid_points(codes) - _e4m3_grid_points(want_codes)).abs()
            steps = int(apart.max()) if apart.numel() else 0
            if steps <= 1:
                matching.append(entry)
            nearest = steps if nearest is None else min(nearest, steps)
        if matching:
            entry = min(matching, key=lambda e: e[2])
            ties.append(_assert_at_most_ties(_e4m3_grid_points(codes), _e4m3_grid_points(entry[0])))
            entry[2] += 1
            return entry[0], entry[1]
        shape = tuple(codes.shape)
        raise AssertionError(f"the second run's codes {shape} are up to {nearest} grid steps from the first's with "
                             "the same scales" if nearest else f"no quantization of the first run has the second's "
                             f"shape {shape} and scales")  # fmt: skip

    def replay_rows(*a, **kw):
        codes, scales = rows_fp8(*a, **kw)  # the second run's own (in `out` where given)
        want_codes, want_scales = recorded(codes, scales)
        codes.copy_(want_codes)
        scales.copy_(want_scales)
        return codes, scales

    def replay_input_codes(x, inv_smooth):
        return tuple(t.clone() for t in recorded(*input_codes(x, inv_smooth)))

    def replay_activations(h, spec, *rest):
        own, want = activations(h, spec, *rest), int_tape.pop(0)
        ties.append(_assert_at_most_ties(_grid_points(own, h, spec), _grid_points(want, h, spec)))
        return want

    passes = (*get_custom_graph_passes(inductor_config.pre_grad_custom_pass), plain_inputs_through_pre_pass)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch, inductor_config.patch(
            pre_grad_custom_pass=list(passes), pre_grad_pass_timing="early"):  # fmt: skip
        patch.setattr(rowquant, "quantize_rows_fp8", record_rows)
        patch.setattr(reference, "quantize_activations", record_activations)
        recorded_out = first()
        assert fp8_tape or int_tape, "no quantizer ran"
        patch.setattr(rowquant, "quantize_rows_fp8", replay_rows)
        patch.setattr(fp8, "fp8_input_codes", replay_input_codes)
        patch.setattr(reference, "quantize_activations", replay_activations)
        replayed_out = second()
    assert not int_tape, f"the second run ran {len(int_tape)} int quantizer(s) fewer than the first"
    unmatched = sum(entry[2] == 0 for entry in fp8_tape)
    assert not unmatched, f"the first run quantized {unmatched} FP8 input(s) that the second did not"
    torch.testing.assert_close(recorded_out, replayed_out, rtol=rtol, atol=atol)
    return sum(ties)


def pre_grad_only(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """A `torch.compile` backend: Dynamo's graph after the pre-grad passes inductor would run on it (the fusion
    pass), run as it is. What the fusion pass makes of a model, in seconds where inductor's code takes tens."""
    for custom_pass in get_custom_graph_passes(inductor_config.pre_grad_custom_pass):
        custom_pass(gm.graph)
    gm.recompile()
    return gm.forward


def plain_inputs_through_pre_pass(graph: torch.fx.Graph) -> None:
    """Every `ditq::fp8_input_codes` the fusion pass left, as a pre-pass call without a producer."""
    for node in [n for n in graph.nodes if n.target is fp8.fp8_input_codes]:
        x, inv_smooth = node.args
        with graph.inserting_before(node):
            rows = graph.call_method("reshape", (x, -1, x.meta["example_value"].shape[-1]))
            node.replace_all_uses_with(graph.call_function(torch.ops.ditq.quantize_rows_fp8.default,
                                                           (rows, inv_smooth, "none")))  # fmt: skip
        graph.erase_node(node)


def _assert_at_most_ties(own: torch.Tensor, want: torch.Tensor) -> int:
    """How many grid points differ; raises unless each is one step off and few are (one always may)."""
    if not own.numel():
        return 0
    apart = (own - want).abs()
    differ = int((apart > 0).sum())
    assert int(apart.max()) <= 1 and differ <= max(1, MAX_TIE_FRACTION * apart.numel()), (
        f"the second run's codes are up to {int(apart.max())} grid steps from the first's, {differ} of "
        f"{apart.numel()} differ"
    )
    return differ


def _e4m3_grid_points(codes: torch.Tensor) -> torch.Tensor:
    """Each e4m3 code's place among e4m3 values: neighbours differ by one (±0 both 0)."""
    bits = codes.view(torch.uint8).int()
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


def _grid_points(h_q: torch.Tensor, h: torch.Tensor, spec) -> torch.Tensor:
    """The grid point of each value of a dynamic int or FP8 fake quantization of (nearly) `h`: its value over the
    scale `h` gives, rounded to the grid (the scales of two nearly equal inputs differ by far less than a step)."""
    if spec.a_format == "fp8":
        return _e4m3_grid_points(fp8_cast(h_q, fp8_scale(h, spec.a_group_size)))
    scale, _ = compute_qparams(h, spec.a_bits, spec.a_group_size, spec.a_symmetric)  # (..., groups)
    return torch.round(grouped(h_q.float(), scale.shape[-1]) / scale.unsqueeze(-1)).int()
