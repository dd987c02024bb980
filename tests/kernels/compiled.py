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

from ditq.kernels import reference
from ditq.kernels.triton import rowquant
from ditq.quant.primitives import compute_qparams, fp8_cast, fp8_scale, grouped

# A tie needs the scaled input within float32 rounding (~1e-6 relative) of a midpoint: ~1e-4 of the elements
# on int8's grid, less on e4m3's (16 points per binade). 1% leaves a wide margin and still catches a
# systematic difference (a bf16 rounding kept in one run only moves a few % of e4m3 codes).
MAX_TIE_FRACTION = 0.01


def assert_compiled_matches_eager(
    model: torch.nn.Module, *args, rtol: float = 1e-5, atol: float = 1e-5
) -> int:
    """`torch.compile(model, fullgraph=True)(*args)` against `model(*args)`, both without autograd, for models
    whose activations are quantized by the FP8 pre-pass or dynamic int fake quantization; returns how many
    codes differed (at ties). With the codes shared, rtol/atol bound float32 rounding of the unquantized ops
    (a few ulps each; 1e-5 is ~100)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    return assert_matches_with_shared_codes(lambda: compiled(*args), lambda: model(*args), rtol=rtol, atol=atol)


def assert_matches_with_shared_codes(
    first: Callable[[], torch.Tensor], second: Callable[[], torch.Tensor], *, rtol: float = 1e-5, atol: float = 1e-5
) -> int:
    """`second()` against `first()`, two computations of one function that quantize their activations (FP8
    pre-pass, dynamic int or FP8 fake quantization) in the same order, both without autograd: the codes equal
    but at ties, and the outputs within rtol/atol with the first run's codes shared. Returns how many codes
    differed."""
    tape: list = []  # each quantizer call's output in the compiled run, in call order
    ties = []  # per replayed call, how many codes eager rounded the other way
    rows_fp8, activations = rowquant.quantize_rows_fp8, reference.quantize_activations

    def record_rows(*a, **kw):
        codes, scales = rows_fp8(*a, **kw)
        tape.append((codes.clone(), scales.clone()))
        return codes, scales

    def record_activations(h, spec, *rest):
        assert spec.a_dynamic, spec  # the grid `_grid_points` reads
        h_q = activations(h, spec, *rest)
        tape.append(h_q.clone())
        return h_q

    def replay_rows(*a, **kw):
        codes, scales = rows_fp8(*a, **kw)  # eager's own (in `out` where given)
        want_codes, want_scales = tape.pop(0)
        ties.append(_assert_at_most_ties(_e4m3_grid_points(codes), _e4m3_grid_points(want_codes)))
        torch.testing.assert_close(scales, want_scales, rtol=rtol, atol=0)  # an absmax: continuous
        codes.copy_(want_codes)
        scales.copy_(want_scales)
        return codes, scales

    def replay_activations(h, spec, *rest):
        own, want = activations(h, spec, *rest), tape.pop(0)
        ties.append(_assert_at_most_ties(_grid_points(own, h, spec), _grid_points(want, h, spec)))
        return want

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(rowquant, "quantize_rows_fp8", record_rows)
        patch.setattr(reference, "quantize_activations", record_activations)
        recorded = first()
        assert tape, "no quantizer ran"
        patch.setattr(rowquant, "quantize_rows_fp8", replay_rows)
        patch.setattr(reference, "quantize_activations", replay_activations)
        replayed = second()
    assert not tape, f"the second run ran {len(tape)} quantizer(s) fewer than the first"
    torch.testing.assert_close(recorded, replayed, rtol=rtol, atol=atol)
    return sum(ties)


def _assert_at_most_ties(own: torch.Tensor, want: torch.Tensor) -> int:
    """How many grid points differ; raises unless each is one step off and few are (one always may)."""
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
