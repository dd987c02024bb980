"""W4A8-FP8 on Hopper: int2–int4 or ternary weights as FP8 e4m3, per-token FP8 activations, FP8 tensor cores.

    x ──(·inv_smooth, row absmax, e4m3 codes: ordinary ops or the pre-pass)──► X_q, s_x ──────────┐
    X_q · L1_q (SVDQuant's down-projection, a Triton kernel) ──► e4m3 P, twice behind X_q's columns ─┤
    packed codes ──(Triton op `ditq::expand_fp8`: exact e4m3)──► W_q, then U_high, U_low ─────────┼─► _scaled_mm
    ([X_q | P | P], [W_q | U_high | U_low]ᵀ, s_x, s_w) + b: main product and low-rank branch in ONE GEMM ─┘

The activation quantization is the op `ditq::fp8_input_codes`, ordinary PyTorch ops on purpose: under
`torch.compile` they fuse into the kernel that produces x, so quantizing costs no extra pass over the
activations — a separate quantization kernel (the first version of this backend, and torchao's float8)
re-reads every activation once more, which cost more than the FP8 GEMMs saved. The exceptions are the
producers inductor fuses badly with a row reduction (LayerNorm + adaLN modulate, GELU): the graph pass of
`ditq.kernels.fusion` replaces such an input's op by the Triton op `ditq::quantize_rows_fp8`, which applies the
producer, the smoothing and the row scale in one read of each row; every layer with a low-rank branch calls
that op itself. Eager runs the ordinary ops. SVDQuant's
smoothing x / smooth is applied as x · inv_smooth, its float32 reciprocal computed once in
`prepare_for_inference`, the product kept in float32 (at most one bf16 step from the quotient the other backends
compute; unrounded, so eager, compiled and the pre-pass give the same codes): with the correctly rounded
quotient a smoothed input's pre-pass took 1.3–2.9× the unsmoothed one's time on an H200, from each input's
best launch to the unsmoothed default (`bench/results/`
`prepass_defaults_v12_h200.json`, `prepass_smoothed_grid_h200.json`; the product's time is not measured there).
Per-channel weight scales go to cuBLAS: |q| ≤ 8 is exact in e4m3 and the scale goes to the GEMM's `scale_b`.
Per-group scales (groups of K a multiple of 32) cannot ride in `scale_b`: those layers take the lowbit GEMM's
FP8 mode instead (`ditq.kernels.triton.lowbit_gemm`), which converts the packed codes to e4m3 in registers and
applies each group's scale to its partial sum. It keeps the weights 2–4-bit, but takes 1.4–2.7× the time of
cuBLAS FP8 on an 8-bit copy at DiT-XL/2's shapes of 512 rows and more (H200, `bench/results/w4a8_gemm_h200.md`),
so per-channel layers stay on cuBLAS at every size. SVDQuant's branch (x/smooth)·L1·L2 rides in the same GEMM
as 2·rank more columns of K (`_lowrank_parts`): its operands are e4m3 too (a few % of the branch off where the
other backends keep it in x's dtype, no loss of sample quality seen: `bench/results/lowrank_precision_cpu.json`);
a separate 16-bit up-projection would re-read and re-write every output (DiT-XL/2 SVDQuant r32 at batch 64 on an H200:
0.71× bf16 that way, 1.06× this way; 1.10× on 2026-12-04 with the MLP's residual add in the next pre-pass,
`bench/results/e2e_fp8_v10_models_h200.md`).

Two backends, which differ for per-channel layers only (per-group layers read their packed codes in both):
`"fp8"` expands the codes on every call (weights stay 2–4-bit in memory; the expansion costs a few µs per
layer), `"fp8-cached"` expands once in `prepare_for_inference` (8-bit weights in memory, no per-call
expansion). `"fp8-gluon"` is `"fp8"` but on sm_90 it expands nothing for the layers the Gluon W4A8 kernel runs
(per-channel or g64/g128 scales, no low-rank branch, K a multiple of 128; per channel only with fast
accumulation): their GEMM is that kernel on codes re-packed at prepare, converted to e4m3 in registers
(`ditq.kernels.hopper`, op `ditq::gluon_w4a8_gemm`), which the fusion pass leaves as it is (it rewrites the
layer's input only). `"fp8"` sends calls of at most `LOWBIT_MAX_ROWS` rows, bound by weight bytes, to the `"lowbit"` kernel instead,
which reads the packed codes directly (activations smoothed the same way and fake-quantized to the same FP8
values, a low-rank branch in float32) rather than expanding them. Both run on
CUDA devices with FP8 tensor cores (sm_89+), and on the CPU under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ditq.kernels.hopper import WGMMA_CODES, gluon_support, gluon_w4a8_gemm, wgmma_codes
from ditq.kernels.lowbit import LOWBIT_MAX_ROWS, code_offset, lowbit_forward, lowbit_gemm
from ditq.kernels.reference import Modulation, Norm, Residual, smoothed_by_reciprocal
from ditq.kernels.triton import FP8_K_STEP, device_support, kernel_op
from ditq.quant.primitives import FP8_MAX, fp8_cast, fp8_quantize, fp8_scale
from ditq.quant.qlinear import QuantLinear

__all__ = [
    "DEFAULT_FAST_ACCUMULATION",
    "FP8_BACKENDS",
    "cat_e4m3",
    "expand_fp8",
    "fp8_gemm_rows",
    "fp8_input_codes",
    "fp8_linear",
    "fp8_support",
    "gluon_or_per_call_buffers",
    "quantize_rows",
    "uses_few_row_path",
]

MIN_CAPABILITY = (8, 9)
FP8_BACKENDS = ("fp8", "fp8-gluon", "fp8-cached")
# cuBLAS FP8 GEMMs with fast accumulation: the tensor cores' partial sums are not promoted to float32 along K
# (torchao's float8 inference runs so too). The FP8 backends' default; `prepare_for_inference(...,
# fast_accumulation=False)` turns it off. On an H200: a FLUX.1-dev-size transformer (K up to 15,360) at 1024 px
# took 104.4 ms per step with it against 108.4–111.9 ms without, its output error vs bf16 unchanged (0.004529
# against 0.004527–0.004530 without, `bench/results/diffusers_h200.md`); DiT-MNIST W4A8-FP8 samples stay 40.4 dB
# from the reference backend's (40.6 without; `bench/results/samples_match_fast_accum_h200.json`).
DEFAULT_FAST_ACCUMULATION = True


def _expanded_fake(qweight, bits, n_cols, ternary):
    return qweight.new_empty((qweight.shape[0], n_cols), dtype=torch.float8_e4m3fn)


@kernel_op("ditq::expand_fp8", fake=_expanded_fake)
def expand_fp8(qweight: torch.Tensor, bits: int, n_cols: int, ternary: bool) -> torch.Tensor:
    """(N, n_cols) float8_e4m3fn codes from packed uint8 (N, packed_cols) symmetric int or ternary codes."""
    from ditq.kernels.triton.expand import expand_to_fp8

    return expand_to_fp8(qweight, bits, n_cols, ternary=ternary)


def _quantized_rows_fake(x, inv_smooth, activation, shift=None, scale=None, tokens=1, eps=0.0, lowrank_down=None,
                         lowrank_down_scale=None, update=None, gate=None, norm=None, norm_weight=None,
                         norm_bias=None, second=None, first_tokens=0):  # fmt: skip
    rows, cols = x.shape
    if second is not None:
        rows, cols = (rows + second.shape[0], cols) if first_tokens else (rows, cols + second.shape[1])
    extra = 0 if lowrank_down is None else 2 * lowrank_down.shape[1]
    return (x.new_empty((rows, cols + extra), dtype=torch.float8_e4m3fn), x.new_empty((rows, 1), dtype=torch.float32),
            x.new_empty(x.shape if update is not None else 0))  # fmt: skip


@kernel_op("ditq::quantize_rows_fp8", fake=_quantized_rows_fake)
def quantize_rows(
    x: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    activation: str,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    tokens: int = 1,
    eps: float = 0.0,
    lowrank_down: torch.Tensor | None = None,
    lowrank_down_scale: torch.Tensor | None = None,
    update: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    second: torch.Tensor | None = None,
    first_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 codes (M, K [+ 2·rank]), float32 row scales (M, 1), x') of h = activation(x), or
    [modulate(] norm(x) [, shift, scale)] [· inv_smooth], x (M, K), or cat([x, activation(second)], -1) (K = the
    columns of both) [· inv_smooth], or, with `first_tokens` T₁, any of them of the rows of x's samples of T₁
    tokens and `second`'s tokens of each concatenated (M = the rows of both), by the Triton pre-pass; with SVDQuant's
    down-projection (`_lowrank_parts`) its e4m3 activations P follow, twice (`ditq.kernels.triton.lowrank`).
    `norm`: one of `reference.NORMS` with `eps` and an optional `norm_weight`, `norm_bias` (K,); None: adaLN's
    LayerNorm without affine with a shift, no norm without. With an `update`, x' = x + gate·update (x + update
    without a gate; a gate's rows per sample are `tokens`) replaces x first and is returned; else x' is empty."""
    from ditq.kernels.triton.rowquant import quantize_rows_fp8

    if norm is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight and norm_bias need a norm")
    kind = norm or ("layer" if shift is not None else None)
    modulation = None if shift is None else Modulation(shift, scale, tokens, eps)
    residual = None if update is None else Residual(update, gate, tokens)
    x_new = torch.empty(x.shape if residual else 0, dtype=x.dtype, device=x.device)
    lowrank = None if lowrank_down is None else (lowrank_down, lowrank_down_scale)
    codes, scales = quantize_rows_fp8(x, inv_smooth, activation, modulation,
                                      norm=None if kind is None else Norm(kind, eps, norm_weight, norm_bias),
                                      residual=residual, residual_out=x_new if residual else None,
                                      lowrank=lowrank, second=second, first_tokens=first_tokens)  # fmt: skip
    return codes, scales, x_new


def fp8_linear(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """y = m(x) through one FP8 GEMM with row-wise scales on both sides (SVDQuant's up-projection rides in it as
    2·rank more columns of K); `m` runs on an FP8 backend."""
    codes, scale_x = _input_codes(m, x)
    return _gemm(m, codes, scale_x, x)


def _plain_input_codes(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    h = smoothed_by_reciprocal(x, inv_smooth).reshape(-1, x.shape[-1])  # (M, K)
    scale_x = fp8_scale(h)  # (M, 1) float32
    return fp8_cast(h, scale_x), scale_x


# The input of an FP8 layer without a low-rank branch: (e4m3 codes (M, K), float32 row scales (M, 1)) of
# x · inv_smooth. Ordinary ops (CompositeImplicitAutograd): eager runs them, and `torch.compile` keeps the call as
# one node for the fusion pass (`ditq.kernels.fusion`), which turns it into the pre-pass with x's producer folded
# in; a call left alone decomposes into these ops, which inductor fuses into the producer.
torch.library.define("ditq::fp8_input_codes", "(Tensor x, Tensor? inv_smooth) -> (Tensor, Tensor)")
torch.library.impl("ditq::fp8_input_codes", "CompositeImplicitAutograd")(_plain_input_codes)
fp8_input_codes = torch.ops.ditq.fp8_input_codes.default


def _input_codes(m: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM's activation operand: (e4m3 codes (M, K [+ 2·rank]), row scales (M, 1))."""
    if m.lowrank_up is None:
        return fp8_input_codes(x, _inv_smooth(m))
    codes, scale_x, _ = quantize_rows(x.reshape(-1, x.shape[-1]), _inv_smooth(m), "none", None, None, 1, 0.0,
                                      m.lowrank_down_fp8, m.lowrank_down_scale)  # fmt: skip
    return codes, scale_x


def _inv_smooth(m: QuantLinear) -> torch.Tensor | None:
    """The float32 reciprocal of `m`'s smoothing that `weight_scale` keeps, or None when `m` does not smooth (or its
    smoothing was folded into its input's producer)."""
    return None if m.input_smooth is None else m.inv_smooth


def _gemm(m: QuantLinear, codes: torch.Tensor, scale_x: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's one FP8 GEMM of x's codes: (..., out_features) in x's dtype."""
    packed = getattr(m, WGMMA_CODES, None)
    if packed is not None:  # "fp8-gluon" on Hopper: the Gluon kernel converts the packed codes in registers
        spec = m.spec
        y = gluon_w4a8_gemm(codes, scale_x, packed, m.scales, m.bias, spec.w_bits, spec.w_format == "ternary",
                            spec.group_size or 0, x.dtype)  # fmt: skip
        return y.reshape(*x.shape[:-1], m.out_features)
    if m.spec.group_size is not None:  # the packed codes, a scale per group: the lowbit kernel's FP8 mode
        bias = None if m.bias is None else m.bias.to(x.dtype)
        y = lowbit_gemm(codes, m.qweight, m.scales, None, bias, m.spec.w_bits, code_offset(m), m.spec.group_size,
                        scale_x, x.dtype)  # fmt: skip
        return y.reshape(*x.shape[:-1], m.out_features)
    if m.gemm_group is None:
        y = fp8_gemm_rows(codes, scale_x, _weight_codes(m), m.fp8_scale_w, m.bias, 0, m.out_features,
                          m.fast_accumulation, x.dtype)  # fmt: skip
    else:  # its rows of the weight, scales and bias its input group's first layer holds (`ditq.kernels.joined`)
        first, (start, stop) = m.gemm_group[0], m.gemm_rows
        y = fp8_gemm_rows(codes, scale_x, first.weight_fp8, first.fp8_scale_w, first.joined_bias, start, stop,
                          m.fast_accumulation, x.dtype)  # fmt: skip
    return y.reshape(*x.shape[:-1], m.out_features)


def _gemm_rows(codes: torch.Tensor, scale_x: torch.Tensor, weight: torch.Tensor, scale_w: torch.Tensor,
               bias: torch.Tensor | None, start: int, stop: int, fast_accumulation: bool,
               out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """codes · weight[start:stop]ᵀ · s_x · s_w[start:stop] + bias[start:stop]: (M, stop − start) in `out_dtype`."""
    bias = None if bias is None else bias[start:stop].to(out_dtype)
    fused_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
    y = torch._scaled_mm(codes, weight[start:stop].t(), scale_a=scale_x, scale_b=scale_w[:, start:stop],
                         bias=bias if fused_bias else None, out_dtype=out_dtype,
                         use_fast_accum=fast_accumulation)  # fmt: skip
    return y + bias if bias is not None and not fused_bias else y


# One FP8 GEMM over output rows [start, stop) of an e4m3 weight (N, K): the layer's own weight (all its rows), or
# the weight its input group shares (`ditq.kernels.joined`). Ordinary ops (CompositeImplicitAutograd), like
# `fp8_input_codes`: `torch.compile` keeps the call as one node, and the fusion pass turns the calls of one group
# on one input into a single GEMM over the group's rows and column slices of its output.
torch.library.define("ditq::fp8_gemm_rows", "(Tensor codes, Tensor scale_x, Tensor weight, Tensor scale_w, "
                     "Tensor? bias, SymInt start, SymInt stop, bool fast_accumulation, ScalarType out_dtype) -> Tensor")  # fmt: skip
torch.library.impl("ditq::fp8_gemm_rows", "CompositeImplicitAutograd")(_gemm_rows)
fp8_gemm_rows = torch.ops.ditq.fp8_gemm_rows.default


def fp8_support(m: QuantLinear) -> str | None:
    """None when the FP8 backends can run `m`, else why not."""
    spec = m.spec
    unsupported = device_support(m.qweight.device, MIN_CAPABILITY, "FP8 tensor cores", "FP8")
    if unsupported:
        return unsupported
    if spec.w_format == "int" and not (spec.symmetric and spec.w_bits <= 4 and spec.code_bits == spec.w_bits):
        return "weights must be symmetric int2–int4 (or ternary), served at their stored bits"
    if spec.group_size is not None and m.lowrank_up is not None:
        return GROUPED_LOWRANK
    if spec.group_size is not None and spec.group_size % FP8_K_STEP:
        return f"per-group weight scales need groups of a multiple of {FP8_K_STEP} columns"
    if (spec.a_bits, spec.a_format, spec.a_group_size, spec.a_dynamic) != (8, "fp8", None, True):
        return "activations must be dynamic per-token FP8"
    if m.in_features % 16 or m.out_features % 16:
        return "FP8 GEMMs need in/out features divisible by 16"
    if m.lowrank_up is not None and not _shifts_fit(_lowrank_parts(m)[3]):
        return LOWRANK_RANGE
    return None


def per_call_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if uses_few_row_path(m, x):
        return lowbit_forward(m, x, _inv_smooth(m))
    return fp8_linear(m, x)


def uses_few_row_path(m: QuantLinear, x: torch.Tensor) -> bool:
    """Whether the "fp8" backend hands `m(x)` to the lowbit kernel: few-token GEMMs are bound by weight bytes,
    and reading the packed codes directly beats expanding them first (H100, adaLN 64×1152×6912: lowbit
    15.7 µs; expansion 16.4 µs + FP8 GEMM 12.7 µs). Not a layer on the Gluon GEMM, which reads them 2–4-bit too
    and holds them alone (`ditq.kernels.hopper`)."""
    return (m.backend in ("fp8", "fp8-gluon") and WGMMA_CODES not in m.kernel_buffers
            and x.numel() <= LOWBIT_MAX_ROWS * x.shape[-1])  # fmt: skip


def weight_scale(m: QuantLinear) -> dict[str, torch.Tensor]:
    """The per-channel scales as cuBLAS's row-wise `scale_b` (1, N), SVDQuant's branch if `m` has one, and the
    reciprocal of its smoothing (float32 (K,)) if it smooths at run time; no scales for per-group layers (the lowbit kernel
    reads the packed codes and the scales as they are)."""
    smoothing = _reciprocal_smoothing(m)
    if m.spec.group_size is not None:
        return smoothing
    scale = m.scales.detach().reshape(1, m.out_features).float()
    if m.lowrank_up is None:
        return smoothing | {"fp8_scale_w": scale.contiguous()}
    up_codes, down_codes, down_scale, shift = _lowrank_parts(m)
    if not _shifts_fit(shift):
        raise ValueError(LOWRANK_RANGE)
    high = up_codes.to(torch.float8_e4m3fn)
    low = (up_codes - high.float()).to(torch.float8_e4m3fn)  # what one e4m3 rounding of U leaves
    buffers = smoothing | {"fp8_scale_w": (scale * shift.reshape(1, -1)).contiguous(), "lowrank_down_fp8": down_codes,
               "lowrank_down_scale": down_scale, "lowrank_up_fp8": cat_e4m3([high, low])}  # fmt: skip
    # only where a row moved: "fp8" divides its expanded codes by it on every call
    return buffers | ({"weight_row_shift": (1 / shift).reshape(-1, 1)} if (shift > 1).any() else {})


def gluon_or_per_call_buffers(m: QuantLinear) -> dict[str, torch.Tensor]:
    """What "fp8-gluon" adds to `m`: where the Gluon GEMM runs `m` (`ditq.kernels.hopper`, decided here once,
    after `prepare_for_inference` set `m.fast_accumulation`) its codes re-packed for that kernel and the reciprocal
    of its smoothing; else what "fp8" adds, `weight_scale`'s buffers."""
    if gluon_support(m, m.fast_accumulation) is None:
        return _reciprocal_smoothing(m) | wgmma_codes(m)
    return weight_scale(m)


def _reciprocal_smoothing(m: QuantLinear) -> dict[str, torch.Tensor]:
    """{"inv_smooth": float32 (K,) 1 / smoothing} where `m` smooths at run time, else nothing."""
    smooth = m.input_smooth
    return {} if smooth is None else {"inv_smooth": (1 / smooth.detach().float()).contiguous()}


def expanded_weight(m: QuantLinear) -> dict[str, torch.Tensor]:
    """`weight_scale`'s buffers and the e4m3 weight cuBLAS reads (`fp8-cached`): the codes, then U's two parts
    when `m` has a branch (the row shifts applied); per-group layers keep their packed codes, so nothing."""
    buffers = weight_scale(m)
    if m.spec.group_size is not None:  # the lowbit kernel's FP8 mode reads the packed codes
        return buffers
    if m.lowrank_up is None:
        return buffers | {"weight_fp8": _expanded(m)}
    return buffers | {"weight_fp8": _with_lowrank(_expanded(m), buffers.pop("weight_row_shift", None),
                                                  buffers.pop("lowrank_up_fp8"))}  # fmt: skip


MAX_ROW_SHIFT = 2.0**9  # q · 2^-j stays exact in e4m3 for |q| ≤ 8 while j ≤ 9 (subnormals are steps of 2^-9)
LOWRANK_BUFFERS = ("lowrank_down_fp8", "lowrank_down_scale")  # what both FP8 backends keep of the branch
INPUT_BUFFERS = ("inv_smooth", *LOWRANK_BUFFERS)  # what the input's pre-pass reads: equal in an input group
LOWRANK_RANGE = "the low-rank branch needs more than 2^9 of headroom beside the weight's channel scales (or one is 0)"
GROUPED_LOWRANK = ("a low-rank branch needs per-channel weight scales (the branch rides in cuBLAS's FP8 GEMM): "
                   "quantize with SVDQuant(group_size=None, ...), not the svdquant-w4a8 preset's groups of 64")


def _lowrank_parts(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVDQuant's branch y += (x/smooth) · L1 · L2 as e4m3 operands of the layer's FP8 GEMMs, its rank padded
    with zeros to a power of two ≥ 16 (tensor-core tiles): (U (N, rank) float32, L1 codes (K, rank), 1/‖L1_q‖₁
    (1, rank), shift (N,) powers of two ≥ 1).

    L1 is quantized with a scale s per rank column; P = X_q · L1_q / ‖L1_q‖₁ is then within ±448 whatever
    X_q holds (|X_q| ≤ 448), so its e4m3 codes never saturate (`ditq.kernels.triton.lowrank`).
    U = a·L2ᵀ/(s_w·shift) with a = s·‖L1_q‖₁, so that the GEMM's s_x·(s_w·shift)·(P · Uᵀ) is
    (x/smooth)·L1·L2 up to the e4m3 roundings. A row of U that would pass 448
    moves its channel scale up by `shift` (the weight codes of that row divide by it, exactly). U enters the
    GEMM as two e4m3 parts, U_high + U_low, each multiplied by P: one rounding of U alone costs 1–1.7 dB PSNR on
    DiT-MNIST (a fixed error on the layer's dominant directions), the roundings of L1 and P do not show
    (`bench/results/lowrank_precision_cpu.json`).
    """
    rank = m.lowrank_down.shape[1]
    pad = max(16, 1 << (rank - 1).bit_length()) - rank
    down = F.pad(m.lowrank_down.detach().float().t(), (0, 0, 0, pad))  # (rank, K)
    up = F.pad(m.lowrank_up.detach().float(), (0, 0, 0, pad))  # (rank, N)
    down_codes, s = fp8_quantize(down)  # (rank, K), (rank, 1)
    l1 = down_codes.float().abs().sum(1)  # (rank,)
    down_scale = (1 / torch.where(l1 > 0, l1, 1.0)).reshape(1, -1)
    up = up.t() * (s.squeeze(1) * l1) / m.scales.detach().float().reshape(-1, 1)  # (N, rank)
    need = up.abs().amax(1) / FP8_MAX  # (N,)
    shift = torch.exp2(torch.ceil(torch.log2(need.clamp_min(1.0))))
    shift = torch.where(need > shift, 2 * shift, shift)  # log2's rounding at exact powers of two
    return up / shift.reshape(-1, 1), down_codes.t().contiguous(), down_scale, shift


def _shifts_fit(shift: torch.Tensor) -> bool:
    """Whether every row shift is finite and at most 2^9 (a zero channel scale makes U infinite or NaN)."""
    return bool((shift <= MAX_ROW_SHIFT).all())


def _with_lowrank(codes: torch.Tensor, row_shift: torch.Tensor | None, up_codes: torch.Tensor) -> torch.Tensor:
    """The (N, K + 2·rank) e4m3 weight: the codes' rows divided by their shift (exact; None: no row moved),
    then U's high and low parts behind them."""
    shifted = codes if row_shift is None else (codes.float() * row_shift).to(torch.float8_e4m3fn)
    return cat_e4m3([shifted, up_codes])


def cat_e4m3(codes: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """e4m3 tensors joined along `dim` as bytes: inductor's concatenation of e4m3 tensors fails on Triton 3.6 (no
    `get_fp8e4nv`)."""
    return torch.cat([c.view(torch.uint8) for c in codes], dim=dim).view(torch.float8_e4m3fn)


def _weight_codes(m: QuantLinear) -> torch.Tensor:
    """The layer's e4m3 weight (N, K [+ 2·rank]): kept by "fp8-cached", expanded per call by "fp8"."""
    if m.backend == "fp8-cached":
        return m.weight_fp8
    codes = _expanded(m)
    if m.lowrank_up is None:
        return codes
    return _with_lowrank(codes, getattr(m, "weight_row_shift", None), m.lowrank_up_fp8)


def _expanded(m: QuantLinear) -> torch.Tensor:
    """The layer's codes as e4m3 (N, K)."""
    return expand_fp8(m.qweight, m.spec.w_bits, m.in_features, m.spec.w_format == "ternary")
