"""`FakeQuantLinear`: the trainable stand-in for a `QuantLinear` during quantization-aware training.

It keeps a full-precision latent `weight` (out, in) and `bias` as parameters; every forward multiplies
by the weight as the packed layer would serve it (SPEC §2 quantizer, §5 ternary, §6 nested slices) and
passes gradients to the latent weight with a straight-through estimator. `ditq.qat.convert` turns it
into the `QuantLinear` that computes the same outputs from packed codes.

| `spec`                         | served weight Ŵ                                                        |
|--------------------------------|-------------------------------------------------------------------------|
| int, `w_bits=b`                | s·(clamp(round(W/s) + z) − z), s and z per row/group from W's range      |
| int, `stored_bits=B > w_bits`  | s·S(q, b), q the symmetric B-bit codes, S the MatQuant slice (`slice_codes`)|
| ternary                        | s·W̃, W̃ = clamp(round(W/(γ+ε)), −1, 1), γ = mean|W| (absmean, ε = 1e-6) |

Ternary (TerDiT, SPEC §5): s is γ (BitNet b1.58), or with `learnable_scale` TerDiT's learned α, one per
layer, initialised to γ (positive; the reference code draws it from N(0, 1)). The STE is the identity on
W̃ (TerDiT's `ternary.backward`): ∂L/∂W = α·∂L/∂Ŵ and ∂L/∂α = Σ ∂L/∂Ŵ ⊙ W̃, the latter scaled by 1/√N
as LSQ scales a step size shared by N weights, so that α does not dominate the clipped gradient norm.
An all-zero weight (adaLN-Zero) has γ = 0; α then starts at the absmean of a Xavier-uniform weight of
that shape, √(6/(in+out))/2, because α = 0 would give neither α nor W a gradient, ever.
`chunks = c` splits the output rows into c equal parts with their own γ and α: the q, k and v of a fused
`qkv` Linear keep the scales they would have as separate layers. The converted `QuantLinear` repeats
each part's scale over its rows (its scales are per row), so conversion stays exact.

With `learnable_scale`, int scales are a parameter `scale` of shape (out, n_groups) initialised from the
weight's range, trained LSQ-style (gradient through round by STE, scaled by 1/√(g·qmax)).
`spec.w_bits` is the served bit-width: `set_served_bits` moves a whole model between the nested slices
that share one set of stored codes.
"""

from __future__ import annotations

import math
import warnings
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ditq.checks import naming_layer
from ditq.quant.modules import register_quant_module
from ditq.quant.primitives import (
    SCALE_FLOOR,
    compute_qparams,
    dequantize,
    qrange,
    quantize,
    slice_codes,
    slice_range,
    straight_through,
)
from ditq.quant.qlinear import QuantLinear, quantize_activations, served_spec
from ditq.quant.spec import QuantSpec

__all__ = ["FakeQuantLinear", "set_served_bits"]

TERNARY_EPS = 1e-6
"""ε of the absmean quantizer: codes = clamp(round(W / (γ + ε)), −1, 1)."""

_ENTRY_KEYS = ("spec", "bias", "learnable_scale")
_OPTIONAL_KEYS = {"chunks": 1}  # absent in checkpoints written before per-chunk ternary scales


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant (LSQ's scale-gradient factor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) with the gradient of x."""
    return straight_through(x, torch.round(x))


@register_quant_module
class FakeQuantLinear(nn.Module):
    """y = q_a(x) @ Ŵᵀ + b with Ŵ the served quantized weight; gradients reach `weight` (and `scale`)."""

    kind: ClassVar[str] = "fake_quant_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        *,
        learnable_scale: bool = False,
        chunks: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_chunks(chunks, spec, out_features)
        _check_spec(spec)
        spec.check_fits(in_features, out_features)
        if not isinstance(learnable_scale, bool):
            raise TypeError(f"learnable_scale={learnable_scale!r} must be True or False")
        if learnable_scale and spec.w_format == "int" and not spec.symmetric:
            raise ValueError("learnable_scale trains symmetric scales only; got symmetric=False")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.learnable_scale, self.chunks = learnable_scale, chunks
        kw = dict(device=device, dtype=torch.float32 if dtype is None else dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.scale = None
        if learnable_scale:
            shape = (chunks,) if spec.w_format == "ternary" else (out_features, spec.n_groups(in_features))
            self.scale = nn.Parameter(torch.ones(shape, device=device, dtype=torch.float32))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: QuantSpec, *, learnable_scale: bool = False, chunks: int = 1
    ) -> FakeQuantLinear:
        """Start from `linear`'s weights; a learnable scale starts where round-to-nearest would put it."""
        w = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            spec,
            linear.bias is not None,
            learnable_scale=learnable_scale,
            chunks=chunks,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            module.weight.copy_(w)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
            if module.scale is not None:
                module.scale.copy_(module.initial_scale())
        return module

    # ---- the served weight ----------------------------------------------------------------------

    def serve_bits(self, bits: int) -> None:
        """Serve (and train) the `bits` most significant bits of the stored codes (`served_spec`)."""
        self.spec = served_spec(self.spec, bits)

    def initial_scale(self) -> torch.Tensor:
        """Ternary: γ = mean|W| per chunk, shape (chunks,), with the Xavier absmean where γ = 0 (see
        the module docstring); int: absmax/qmax per row/group at the stored bits."""
        if self.spec.w_format == "ternary":
            gamma = self.ternary_codes()[1]
            fallback = math.sqrt(6.0 / (self.in_features + self.out_features)) / 2
            return torch.where(gamma > 0, gamma, torch.full_like(gamma, fallback))
        return compute_qparams(self.weight, self.spec.code_bits, self.spec.group_size, True)[0]

    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What `QuantLinear.set_codes` takes: (codes at the stored bits, scales (out, n_groups), zeros).

        Codes are int8 for symmetric and ternary specs, uint8 (with uint8 zeros) for asymmetric ones.
        """
        spec = self.spec
        with torch.no_grad():
            if spec.w_format == "ternary":
                return self._ternary_codes_and_scales()
            scale, zero = self._int_qparams()
            return (
                quantize(self.weight, scale.detach(), zero, spec.code_bits, spec.symmetric),
                scale.detach(),
                zero,
            )

    def quantized_weight(self) -> torch.Tensor:
        """Ŵ (out, in) in float32 as the converted layer serves it; differentiable by STE."""
        if self.spec.w_format == "ternary":
            return self._ternary_weight()
        if self.scale is not None:
            return self._lsq_weight()
        spec = self.spec
        scale, zero = self._int_qparams()
        codes = quantize(self.weight, scale, zero, spec.code_bits, spec.symmetric)
        if spec.w_bits < spec.code_bits:
            codes = slice_codes(codes, spec.code_bits, spec.w_bits, extra_precision=spec.extra_precision)
        w_hat = dequantize(codes, scale, zero, spec.group_size)
        return straight_through(self.weight.float(), w_hat)

    def _int_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.scale is not None:
            return self.scale.float().clamp_min(SCALE_FLOOR), None
        return compute_qparams(self.weight, self.spec.code_bits, self.spec.group_size, self.spec.symmetric)

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W̃ = clamp(round(W/(γ+ε)), −1, 1) (int8, (out, in)) and γ = mean|W| per chunk (float32, (chunks,))."""
        w = self.weight.detach().float().reshape(self.chunks, -1, self.in_features)  # (c, out/c, in)
        gamma = w.abs().mean(dim=(1, 2))  # (c,)
        codes = torch.round(w / (gamma[:, None, None] + TERNARY_EPS)).clamp(-1, 1)
        return codes.reshape(self.out_features, self.in_features).to(torch.int8), gamma

    def _rows(self, per_chunk: torch.Tensor) -> torch.Tensor:
        """(chunks,) → (out, 1): each chunk's value repeated over its rows."""
        return per_chunk.repeat_interleave(self.out_features // self.chunks).unsqueeze(1)

    def _ternary_weight(self) -> torch.Tensor:
        codes, gamma = self.ternary_codes()
        w = self.weight.float()
        if self.scale is None:  # BitNet b1.58: Ŵ = γ·W̃, identity STE on Ŵ
            return straight_through(w, self._rows(gamma) * codes.float())
        # TerDiT: Ŵ = α·W̃ with the identity STE on W̃, so ∂L/∂W = α·∂L/∂Ŵ; ∂L/∂α = Σ ∂L/∂Ŵ ⊙ W̃ over the
        # chunk, scaled by 1/√N (N weights share α, qmax = 1: LSQ's factor) to keep it from dominating the
        # clipped global gradient norm.
        alpha = _ScaleGrad.apply(self.scale.float(), 1.0 / math.sqrt(w.numel() // self.chunks))
        return self._rows(alpha) * straight_through(w, codes.float())

    def _ternary_codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Codes and per-row positive scales that serve exactly Ŵ: a negative α serves −α·(−W̃), and a
        zero α (Ŵ = 0) zero codes with scale 1."""
        codes, gamma = self.ternary_codes()
        scale = gamma if self.scale is None else self.scale.detach().float()
        sign = self._rows(torch.sign(scale)).to(torch.int8)  # (out, 1)
        magnitude = torch.where(scale != 0, scale.abs(), torch.ones_like(scale))
        n_groups = self.spec.n_groups(self.in_features)
        return codes * sign, self._rows(magnitude).expand(self.out_features, n_groups).contiguous(), None

    def _lsq_weight(self) -> torch.Tensor:
        """LSQ: q = clamp(round(W/s)), Ŵ = s·q; round passes gradients straight through, clamp stops them."""
        spec = self.spec
        n_groups = self.scale.shape[-1]
        group = self.in_features // n_groups
        qmin, qmax = qrange(spec.code_bits, True)
        s = _ScaleGrad.apply(self.scale.float().clamp_min(SCALE_FLOOR), 1.0 / math.sqrt(group * qmax))
        w = self.weight.float().reshape(self.out_features, n_groups, group)
        q = _round_ste(w / s.unsqueeze(-1)).clamp(qmin, qmax)
        if spec.w_bits < spec.code_bits:
            lo, hi = slice_range(spec.w_bits, spec.extra_precision)
            step = 2 ** (spec.code_bits - spec.w_bits)
            q = _round_ste(q / step).clamp(lo, hi) * step
        return (q * s.unsqueeze(-1)).reshape(self.out_features, self.in_features)

    # ---- forward ----------------------------------------------------------------------------------

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic activation fake quant, exactly as the converted layer runs it."""
        return quantize_activations(x, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(x), self.quantized_weight().to(x.dtype), bias)  # (..., out)

    # ---- checkpoints (ditq.quant.modules protocol) -------------------------------------------------

    def header_entry(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "bias": self.bias is not None,
            "learnable_scale": self.learnable_scale,
            "chunks": self.chunks,
        }

    @classmethod
    def skeleton(cls, linear: nn.Linear, entry: dict[str, Any]) -> FakeQuantLinear:
        entry = {**_OPTIONAL_KEYS, **entry}
        unknown = sorted(set(entry) - set(_ENTRY_KEYS) - set(_OPTIONAL_KEYS))
        missing = sorted(set(_ENTRY_KEYS) - set(entry))
        if unknown or missing:
            raise ValueError(f"fake_quant_linear entry: unknown fields {unknown}, missing fields {missing}")
        if not isinstance(entry["bias"], bool):
            raise ValueError(f"field 'bias' must be true or false, got {entry['bias']!r}")
        spec = QuantSpec.from_dict(entry["spec"])
        return cls(
            linear.in_features,
            linear.out_features,
            spec,
            entry["bias"],
            learnable_scale=entry["learnable_scale"],
            chunks=entry["chunks"],
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"spec={self.spec}, learnable_scale={self.learnable_scale}"
            + (f", chunks={self.chunks}" if self.chunks > 1 else "")
        )


def set_served_bits(model: nn.Module, bits: int, pattern: str = "*") -> int:
    """Serve every nested layer (a `FakeQuantLinear` or `QuantLinear` with `spec.stored_bits`) whose name
    matches `pattern` at `bits`, the slice of its stored codes; the others have one bit-width and are left
    alone. A prepared `QuantLinear` whose width changes falls back to the reference backend, with one warning.

    Returns how many layers matched; raises ValueError when a matching layer stores fewer than `bits`
    bits, or when no nested layer matches.
    """
    chosen = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (FakeQuantLinear, QuantLinear)) and m.spec.stored_bits is not None
        and fnmatchcase(n, pattern)
    ]
    if not chosen:
        raise ValueError(
            f"no nested layer (spec.stored_bits set) in {type(model).__name__} matches pattern {pattern!r}"
        )
    for name, module in chosen:  # all checked before any changes
        with naming_layer(f"layer {name!r}"):
            served_spec(module.spec, bits)
    prepared = [n for n, m in chosen if isinstance(m, QuantLinear) and m.backend != "reference"
                and m.spec.w_bits != bits]
    if prepared:
        warnings.warn(
            f"{len(prepared)} layer(s) (first {prepared[0]!r}) served at {bits} bits leave the backend prepared "
            "for their old width and run the reference until prepare_for_inference is called again",
            stacklevel=2,
        )
    for _, module in chosen:
        module.serve_bits(bits)
    return len(chosen)


def _check_chunks(chunks: int, spec: QuantSpec, out_features: int) -> None:
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks={chunks!r} must be an int >= 1")
    if chunks > 1 and spec.w_format != "ternary":
        raise ValueError(f"chunks={chunks} splits ternary's per-tensor scale; int scales are per row already")
    if out_features % chunks:
        raise ValueError(f"chunks={chunks} does not divide out_features={out_features}")


def _check_spec(spec: QuantSpec) -> None:
    """QAT trains weights (and dynamic activations); calibrated or decomposed parts are PTQ's job."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    unsupported = {
        "rank": spec.rank != 0,
        "smooth": spec.smooth,
        "a_dynamic": spec.a_bits is not None and not spec.a_dynamic,
        "layout": getattr(spec, "layout", "canonical") != "canonical",
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(
            f"FakeQuantLinear does not train {bad}: QAT takes dynamic activations, no low-rank "
            "branch, no smoothing and the canonical layout"
        )
