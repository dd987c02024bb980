"""MatQuant (Nair et al., arXiv 2502.06786; SPEC §6): one set of int8 codes served at any width r by its r most
significant bits, S(q, r) (`ditq.quant.primitives.slice_codes`). Three ways to get the codes:

- `matquant` (QAT): `QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2))`, trained on Σ_r λ_r · L(model at
  r bits) (`nested_weights` = λ; the diffusion loss, or distillation with `ditq train --loss distill`).
- `MatGPTQ` (Kleinegger et al., arXiv 2602.03537), GPTQ's sweep with nested codes (preset `matquant-ptq`):

      scale s per row (group) from the int8 grid of the current columns, symmetric (as `gptq`)
      for each column j of the sweep, each weight w with t = w / s:
          q  = argmin over the 2^B codes c of Σ_r λ_r (w − s·S(c, r))²
             = argmin_c  B_c − 2t·A_c,   A_c = Σ_r λ̄_r S(c, r),  B_c = Σ_r λ̄_r S(c, r)²   (λ̄ = λ / Σλ)
          q̂  = s·A_q, so the error fed back, (w − q̂) / U_jj, is the λ-mean over slices of (w − s·S(q, r))

  The (out, 2^B) scores of a column are one product: all 256 codes are searched, vectorised over the rows.
  `per_width_feedback` keeps one copy W_r of the weight per width instead, each compensated with its own slice's
  error (w_r − s·S(q, r)) / U_jj, the code minimising Σ_r λ_r (w_r − s·S(c, r))²: the objective is then one GPTQ
  objective per width, and no width is compensated for another's rounding (the λ-mean is: on DiT-MNIST it
  costs the int8 slice most of its precision).
- the naive baseline (`matquant-naive`, `matquant-naive-rtn`): plain int8 GPTQ (or RTN) codes, chosen for the
  stored width alone (`nested_bits=(8,)`) and served at any width all the same: what MatQuant must beat.

Slices are nested as grids (the r-bit grid is a subset of the (r+1)-bit grid), but slicing the (r+1)-bit slice
again is not always the r-bit slice (rounding buckets straddle), so every width is sliced from the stored codes.
`extra_precision` gives the 2-bit slice a fifth level (its top bucket, clamped otherwise): the same stored codes,
a served slice of 3-bit codes that is no longer nested in the stored grid (`QuantSpec.extra_precision`).
Widths left out of `nested_bits` have no say in the choice among codes whose chosen slices tie: keep the stored
width in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.calib import CalibData
from ditq.checks import naming_layer
from ditq.methods.gptq import gptq, hessian
from ditq.qat import QAT, check_nested_weights
from ditq.quant.primitives import qrange, slice_codes
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import Needs, Recipe, register_preset
from ditq.registry import register_method

__all__ = ["MATQUANT", "MatGPTQ", "NestedRounding"]


@dataclass(frozen=True, kw_only=True)
class MatGPTQ(Recipe):
    """Nested int codes by GPTQ's sweep, each weight's code minimising the λ-weighted error of its slices at
    `nested_bits`; served at `w_bits` (any width up to `stored_bits` later, `ditq.set_served_bits`)."""

    method: ClassVar[str] = "matgptq"
    w_bits: int = 4  # the width served after quantizing
    stored_bits: int = 8
    nested_bits: tuple = (8, 4, 2)  # widths whose weighted error the codes minimise; (stored_bits,) = naive
    nested_weights: tuple = ()  # λ_r of each of nested_bits; () = all 1
    extra_precision: bool = False  # the 2-bit slice keeps its top bucket (5 levels, not nested)
    per_width_feedback: bool = False  # each width's own error to its own copy of W (False: the λ-mean, MatGPTQ)
    group_size: int | None = None
    a_bits: int | None = None  # dynamic per-token activations
    a_format: Literal["int", "fp8"] = "int"
    gptq: bool = True  # False: no error feedback, each weight alone (round-to-nearest for the naive baseline)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        for name in ("nested_bits", "nested_weights"):
            if isinstance(getattr(self, name), list):  # JSON gives lists back
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()
        spec = self.spec()  # bits, formats and group sizes validated by QuantSpec
        bits = self.nested_bits
        if not bits or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= spec.code_bits
                               for b in bits) or len(set(bits)) != len(bits):  # fmt: skip
            raise ValueError(f"MatGPTQ.nested_bits={bits!r} must be distinct ints in 2..{spec.code_bits} "
                             "(the stored bits)")  # fmt: skip
        check_nested_weights(self.nested_weights, bits)
        if self.block_size <= 0:
            raise ValueError(f"MatGPTQ.block_size={self.block_size} must be a positive int")
        if not 0 <= self.damp <= 1:
            raise ValueError(f"MatGPTQ.damp={self.damp} must lie in [0, 1]")

    def spec(self) -> QuantSpec:
        return self.quant_spec()

    def needs(self) -> Needs:
        return "calibration" if any(r.gptq for r in self.variants()) else "nothing"

    @property
    def naive(self) -> bool:
        """Codes chosen for the stored width alone: the nearest codes, as plain GPTQ or RTN picks them."""
        return self.nested_bits == (self.spec().code_bits,)


class NestedRounding:
    """GPTQ's column quantizer for nested codes (a `ditq.methods.gptq.ColumnRounding`): per weight, the code c of
    the `stored_bits` grid minimising Σ_r λ_r (w_r − s·S(c, r))² over r in `widths` (λ = `weights`, default all 1).

    MatGPTQ's rule (`per_width=False`): one target, w_r = w for every r, and q̂ = s·Σ_r λ̄_r S(c, r) fed back.
    `per_width`: one target per width, w_r compensated only with the r-bit slice's own errors, q̂_r = s·S(c, r):
    the objective is a sum of one GPTQ objective per width, and each width's error is compensated for that width.
    Targets are widest first (the scales come from the first).
    """

    def __init__(self, stored_bits: int, widths: tuple[int, ...], weights: tuple[float, ...] = (), *,
                 extra_precision: bool = False, per_width: bool = False,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        order = sorted(range(len(widths)), key=lambda i: -widths[i])
        lo, hi = qrange(stored_bits, symmetric=True)
        self.codes = torch.arange(lo, hi + 1, device=device, dtype=torch.int8)  # (2^B,)
        self.slices = torch.stack([slice_codes(self.codes, stored_bits, widths[i], extra_precision=extra_precision)
                                   for i in order]).float()  # fmt: skip  # (R, 2^B)
        lam = torch.tensor([float(weights[i]) if weights else 1.0 for i in order], device=device)
        lam = lam / lam.sum()  # λ̄: (R,)
        self.mean_square = lam @ self.slices.square()  # Σ_r λ̄_r S(c, r)²: (2^B,)
        # Σ_r λ̄_r t_r S(c, r) = tᵀ · mix for targets t (T,): one row per target.
        self.mix = lam[:, None] * self.slices if per_width else (lam @ self.slices)[None]  # (T, 2^B)
        self.targets = self.mix.shape[0]
        self.per_width = per_width

    def __call__(self, columns: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = columns / scale  # (T, out)
        # Σ_r λ̄_r (t_r − S(c, r))² less the terms free of c, for every code c: (out, 2^B)
        best = (self.mean_square - 2 * (t.T @ self.mix)).argmin(dim=1)  # (out,)
        served = self.slices[:, best] if self.per_width else self.mix[:, best]  # (T, out)
        return self.codes[best].float(), scale * served


@register_method(MatGPTQ)
def quantize_matgptq(model: nn.Module, targets: dict[str, MatGPTQ], calib: CalibData | None) -> dict[str, nn.Module]:
    layers = {name: (model.get_submodule(name), recipe) for name, recipe in targets.items()}
    for name, (linear, recipe) in layers.items():  # every check before any (slow) sweep
        check_matgptq(name, linear, recipe, calib)
    return {name: matgptq_linear(name, linear, recipe, calib)
            for name, (linear, recipe) in tqdm(layers.items(), desc="MatGPTQ", leave=False)}  # fmt: skip


def check_matgptq(name: str, linear: nn.Linear, recipe: MatGPTQ, calib: CalibData | None) -> None:
    """Raise, naming the layer, if `matgptq_linear` could not quantize `linear` with `recipe`."""
    try:
        recipe.spec().check_fits(linear.in_features, linear.out_features)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if not bool(torch.isfinite(linear.weight).all()):
        raise ValueError(f"{name}: weight holds NaN or infinite values")
    if recipe.gptq:
        if calib is None:
            raise ValueError(f"{name}: MatGPTQ (gptq=True) needs calibration data: pass calib=")
        calib.require(name, rows=True)


def matgptq_linear(name: str, linear: nn.Linear, recipe: MatGPTQ, calib: CalibData | None) -> QuantLinear:
    """`linear` with nested codes per `recipe`; `check_matgptq` must have passed. Without GPTQ the Hessian is
    the identity: no error reaches another column, and each weight's code is chosen alone."""
    spec = recipe.spec()
    weight = linear.weight.detach()
    with naming_layer(name):
        if recipe.gptq:
            h = hessian(calib.inputs[name].to(weight.device))
        else:
            h = torch.eye(linear.in_features, device=weight.device)
        rounding = None if recipe.naive else NestedRounding(
            spec.code_bits, recipe.nested_bits, recipe.nested_weights, extra_precision=recipe.extra_precision,
            per_width=recipe.per_width_feedback, device=weight.device,
        )
        codes, scales, _ = gptq(weight, h, spec, block_size=recipe.block_size, damp=recipe.damp,
                                act_order=recipe.act_order, rounding=rounding)  # fmt: skip
    module = QuantLinear.from_linear(linear, spec)
    module.set_codes(codes, scales)
    return module


MATQUANT = register_preset("matquant", QAT(w_bits=4, stored_bits=8, nested_bits=(8, 4, 2)))
# On DiT-MNIST, MatGPTQ's own rule (λ-mean feedback, widths 8/4/2, λ = 1) left the int8 and int4 slices far below
# plain GPTQ at those widths; per-width feedback, int3 among the widths and int4 weighted up bring int4 to plain
# GPTQ int4 and keep int3 near plain GPTQ int3, at the cost of the int8 slice (PSNR vs FP of 64 samples, CPU;
# plain GPTQ 33.78 dB at 4 bits and 26.46 at 3): λ = (2, 128, 4, 1) gave 32.2 / 33.7 / 25.3 / 17.2 dB at
# 8 / 4 / 3 / 2 bits; (2, 32, 4, 1) 33.3 / 32.7 / 25.8 / 17.5; (2, 128, 8, 1) 31.3 / 33.5 / 25.8 / 17.3.
register_preset("matquant-ptq", MatGPTQ(nested_bits=(8, 4, 3, 2), nested_weights=(2, 128, 4, 1),
                                        per_width_feedback=True))  # fmt: skip
register_preset("matquant-naive", MatGPTQ(nested_bits=(8,)))
register_preset("matquant-naive-rtn", MatGPTQ(nested_bits=(8,), gptq=False))
