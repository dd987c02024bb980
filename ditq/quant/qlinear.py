"""`QuantLinear`: a Linear stored as packed integer codes plus scales — buffers only, no parameters.

The state_dict *is* the checkpoint content, in the canonical layout of `ditq.quant.packing`:

| buffer       | dtype        | shape                         | present when                                   |
|--------------|--------------|-------------------------------|------------------------------------------------|
| `qweight`    | uint8        | (out, packed_cols(in, code_bits)) | always (stored codes: signed + 2^(b-1), ternary + 1) |
| `scales`     | `spec.scale_dtype` (float32) | (out, n_groups) | always (ternary: γ or α, repeated per row/group)  |
| `zeros`      | uint8        | (out, n_groups)               | `not spec.symmetric`                           |
| `bias`       | `dtype`      | (out,)                        | `bias=True`                                    |
| `smooth`     | float32      | (in,)                         | `spec.smooth` (forward divides x by it)¹ ²     |
| `lowrank_down` | `dtype`    | (in, rank)                    | `spec.rank > 0` (X̂·L1, SVDQuant's branch)       |
| `lowrank_up` | `dtype`      | (rank, out)                   | `spec.rank > 0` (·L2)                          |
| `act_scale`  | float32      | (1,) or (in // a_group_size,) | static activation quant (`a_bits`, not `a_dynamic`) |
| `act_zero`   | uint8        | like `act_scale`              | static, int, `not spec.a_symmetric`            |

¹ The FP8 backends multiply x by its float32 reciprocal instead (`ditq.kernels.fp8`), within a bf16 step.
² Or x's producer divides by it (`smoothing_folded`, `input_smooth`: `ditq.kernels.folding`).

n_groups = 1 (group_size None, per output channel) or in // group_size. Ternary weights keep the int
layout (scales (out, n_groups)) so kernels need no special case. The stored weight already includes
the smoothing (W·diag(smooth)) and excludes the low-rank part. Codes are stored at `spec.code_bits`
and served at `spec.w_bits` (their most significant bits, `slice_codes`) when the two differ; `serve_bits`
(`ditq.set_served_bits` for a model) moves a layer to another slice.
Layers of one `spec.input_group` hold equal `smooth`, `lowrank_down`, `act_scale` and `act_zero`
(`INPUT_GROUP_BUFFERS`); a loaded model shares one tensor for each, and a checkpoint stores it once.

`forward` runs the backend chosen by `ditq.prepare_for_inference` (default: the reference oracle); the
choice is a plain attribute set once, so the forward holds no dispatch logic that `torch.compile` must
trace.

A kernel backend that holds an exact copy of the codes on the device (`fp8-cached`'s e4m3 weights, `fp8-gluon`'s
codes re-packed for the Gluon GEMM on sm_90) parks `qweight` in host memory (`park_codes`), so the device holds
one copy of the weights, not two; device moves leave it there, and it comes back to the layer's device when the
backend's buffers are dropped (another backend, new codes, loaded tensors). A checkpoint saved meanwhile reads it
from the host.

`.to(dtype)`/`.half()` leave the integer buffers alone (torch never casts them) and keep `scales`,
`smooth` and `act_scale` in float32: they are part of the quantized format, not the compute dtype.
`bias` and the low-rank factors follow the module dtype; the output dtype always follows x.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from ditq.quant.modules import register_quant_module
from ditq.quant.packing import pack, packed_cols, to_signed, to_unsigned, unpack
from ditq.quant.primitives import (
    compute_qparams,
    dequantize,
    fake_quantize,
    fp8_cast,
    fp8_dequantize,
    fp8_scale,
    quantize,
    slice_codes,
    straight_through,
    ternary_absmean,
)
from ditq.quant.spec import QuantSpec

__all__ = ["INPUT_GROUP_BUFFERS", "QuantLinear", "dequantize_weight", "describe_spec", "quantize_activations",
           "served_spec"]

_FLOAT32_BUFFERS = ("scales", "smooth", "act_scale")
_UINT8_BUFFERS = ("qweight", "zeros", "act_zero")
INPUT_GROUP_BUFFERS = ("smooth", "lowrank_down", "act_scale", "act_zero")


@register_quant_module
class QuantLinear(nn.Module):
    """y = x @ Ŵᵀ + b (+ low-rank branch), Ŵ dequantized from packed codes; see the module docstring."""

    kind = "quant_linear"
    backend = "reference"  # set per instance by ditq.prepare_for_inference
    fixed_dtype_buffers: tuple[str, ...] = ()  # kernel buffers whose dtype is part of the kernel's format
    layer_name: str | None = None  # its name in the model, given by ditq.quant.modules.install; errors name it
    # x arrives divided by `smooth` already: set by ditq.kernels.folding, which folded it into x's producer
    smoothing_folded: bool = False
    codes_home: torch.device | None = None  # where `qweight` returns to while it is parked in host memory
    # layers (this one among them) whose GEMMs read one weight that the first holds, this one its rows
    # [start, stop): set by ditq.kernels.joined for layers that read one input
    gemm_group: tuple[QuantLinear, ...] | None = None
    gemm_rows: tuple[int, int] | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        spec.check_fits(in_features, out_features)
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype (of bias and low-rank factors) must be floating point, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self._set_spec(spec)
        n_groups = spec.n_groups(in_features)

        def buf(shape: tuple[int, ...], dt: torch.dtype, fill: float = 0.0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dt, device=device)

        u8, f32 = torch.uint8, torch.float32
        self.register_buffer("qweight", buf((out_features, packed_cols(in_features, spec.code_bits)), u8))
        self.register_buffer("scales", buf((out_features, n_groups), spec.scale_torch_dtype, 1.0))
        self.register_buffer("zeros", None if spec.symmetric else buf((out_features, n_groups), u8))
        self.register_buffer("bias", buf((out_features,), dtype) if bias else None)
        self.register_buffer("smooth", buf((in_features,), f32, 1.0) if spec.smooth else None)
        rank = spec.rank
        self.register_buffer("lowrank_down", buf((in_features, rank), dtype) if rank else None)
        self.register_buffer("lowrank_up", buf((rank, out_features), dtype) if rank else None)
        static = spec.a_bits is not None and not spec.a_dynamic
        n_act = 1 if spec.a_group_size is None else in_features // spec.a_group_size
        act_zero = static and spec.a_format == "int" and not spec.a_symmetric
        self.register_buffer("act_scale", buf((n_act,), f32, 1.0) if static else None)
        self.register_buffer("act_zero", buf((n_act,), u8) if act_zero else None)

    # ---- construction from a float layer ------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: QuantSpec,
        *,
        weight: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        lowrank_down: torch.Tensor | None = None,
        lowrank_up: torch.Tensor | None = None,
        act_scale: torch.Tensor | None = None,
        act_zero: torch.Tensor | None = None,
        clip_ratio: float | torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize `linear` once with round-to-nearest per `spec`.

        `weight` (out, in) is quantized as given — methods pass their smoothed weight or low-rank
        residual. When omitted it is linear.weight·diag(smooth) − (lowrank_down @ lowrank_up)ᵀ, i.e. the
        residual that makes the module approximate `linear`. Non-finite weights are refused. `clip_ratio` (float or (out, n_groups),
        e.g. from `clip_search`) shrinks the int ranges. Bias and low-rank factors keep linear's dtype.
        """
        out_f, in_f = linear.out_features, linear.in_features
        param = linear.weight
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        module = cls(in_f, out_f, spec, bias=linear.bias is not None, device=param.device, dtype=dtype)
        _require(spec.smooth, smooth, "smooth", "spec.smooth=True")
        _require(spec.rank > 0, lowrank_down, "lowrank_down", f"spec.rank={spec.rank}")
        _require(spec.rank > 0, lowrank_up, "lowrank_up", f"spec.rank={spec.rank}")
        _require(module.act_scale is not None, act_scale, "act_scale", "static activation quantization")
        _require(module.act_zero is not None, act_zero, "act_zero", "static asymmetric int activations")
        with torch.no_grad():
            for name, value in (
                ("smooth", smooth),
                ("lowrank_down", lowrank_down),
                ("lowrank_up", lowrank_up),
                ("act_scale", act_scale),
                ("act_zero", act_zero),
            ):
                if value is not None:
                    _copy_checked(getattr(module, name), value, name)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
            if weight is None:
                weight = param.detach().float()
                if smooth is not None:
                    weight = weight * smooth.float()
                if lowrank_down is not None:
                    weight = weight - (lowrank_down.float() @ lowrank_up.float()).T
            if tuple(weight.shape) != (out_f, in_f):
                raise ValueError(f"weight has shape {tuple(weight.shape)}, the layer needs {(out_f, in_f)}")
            module.quantize_weight_(weight.to(param.device), clip_ratio)
        return module

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor, clip_ratio: float | torch.Tensor | None = None) -> None:
        """Round-to-nearest `weight` (out, in) into the buffers (absmean for ternary) at `spec.code_bits`."""
        spec = self.spec
        _check_finite(weight, "weight")
        if spec.w_format == "ternary":
            if clip_ratio is not None:
                raise ValueError("clip_ratio does not apply to ternary (absmean) weights")
            codes, gamma = ternary_absmean(weight)
            self.set_codes(codes, spec.store_scale(gamma).expand(self.out_features, spec.n_groups(self.in_features)))
            return
        ratio = 1.0 if clip_ratio is None else clip_ratio
        bits = spec.code_bits
        scale, zero = compute_qparams(weight, bits, spec.group_size, spec.symmetric, ratio)
        scale = spec.store_scale(scale)  # codes against the scale as stored
        self.set_codes(quantize(weight, scale, zero, bits, spec.symmetric), scale, zero)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> None:
        """Store codes computed elsewhere (GPTQ, QAT, MatQuant): int8 signed codes for symmetric and
        ternary specs, uint8 codes plus uint8 `zeros` for asymmetric ones, at `spec.code_bits`; scales
        (out, n_groups), finite and positive."""
        spec = self.spec
        self.drop_kernel_buffers()  # they were computed from the old codes
        _check_finite(scales, "scales")
        if scales.numel() and not bool((scales > 0).all()):
            raise ValueError("scales must be positive")
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"codes have shape {tuple(codes.shape)}, expected {(self.out_features, self.in_features)}"
            )
        ternary = spec.w_format == "ternary"
        if spec.symmetric:
            if zeros is not None:
                raise ValueError("a symmetric spec stores no zero points; pass zeros=None")
            bits = spec.code_bits
            lo, hi = (-1, 1) if ternary else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if codes.dtype != torch.int8:
                raise TypeError(f"symmetric codes must be int8, got {codes.dtype}")
            if codes.numel() and not (int(codes.min()) >= lo and int(codes.max()) <= hi):
                raise ValueError(f"codes must lie in [{lo}, {hi}] for this spec")
            stored = to_unsigned(codes, spec.code_bits, ternary=ternary)
        else:
            if zeros is None:
                raise ValueError("an asymmetric spec needs zeros (uint8, (out, n_groups))")
            if codes.dtype != torch.uint8:
                raise TypeError(f"asymmetric codes must be uint8, got {codes.dtype}")
            stored = codes
            _copy_checked(self.zeros, zeros, "zeros")
        self.qweight.copy_(pack(stored.to(self.qweight.device), spec.code_bits))
        _copy_checked(self.scales, scales, "scales")

    def drop_kernel_buffers(self) -> None:
        """Forget what a kernel backend precomputed and fall back to the reference (new codes, new backend). A
        layer whose GEMM joins others' takes them along: their shared weight holds its old codes."""
        group, self.gemm_group, self.gemm_rows = self.gemm_group, None, None
        for name in getattr(self, "kernel_buffers", ()):
            delattr(self, name)
        self.kernel_buffers, self.fixed_dtype_buffers, self.backend = (), (), "reference"
        if self.codes_home is not None:
            self.qweight, self.codes_home = self.qweight.to(self.codes_home), None
        for other in group or ():
            if other.gemm_group is not None:
                other.drop_kernel_buffers()

    def park_codes(self) -> None:
        """Move the packed codes to host memory while a kernel buffer holds them exactly on the device."""
        if self.codes_home is None and self.qweight.device.type != "cpu":
            self.qweight, self.codes_home = self.qweight.cpu(), self.qweight.device

    def serve_bits(self, bits: int) -> None:
        """Serve the `bits` most significant bits of the stored codes (`served_spec`); a kernel
        backend, prepared for the old width, is dropped: the layer runs the reference until prepared again."""
        spec = served_spec(self.spec, bits)
        if spec == self.spec:
            return
        self.drop_kernel_buffers()
        self._set_spec(spec)

    def _set_spec(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.spec_json = json.dumps(spec.to_dict(), sort_keys=True)  # what the custom ops take (a str)

    # ---- the quantized weight -----------------------------------------------------------------------

    def weight_codes(self) -> torch.Tensor:
        """Stored codes (out, in): int8 signed for symmetric/ternary specs, uint8 for asymmetric."""
        return unpack_codes(self.qweight, self.spec, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = scales · (served codes − zeros), shape (out, in): what the reference multiplies by."""
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.spec, self.in_features, dtype)

    @property
    def input_smooth(self) -> torch.Tensor | None:
        """What the forward divides x by: `smooth`, or None where it was folded into x's producer."""
        return None if self.smoothing_folded else self.smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"{self._shown()}: input must be a floating-point tensor, got {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self._shown()}: input of shape {tuple(x.shape)} does not end in "
                             f"in_features={self.in_features}")
        return BACKEND_FORWARDS[self.backend](self, x)  # (..., in) -> (..., out)

    def _shown(self) -> str:
        """How errors name this layer: by its name in the model, else by its shape."""
        if self.layer_name is not None:
            return f"layer {self.layer_name!r}"
        return f"QuantLinear({self.in_features} → {self.out_features})"

    # ---- checkpoint entry (ditq.quant.modules) -------------------------------------------------------

    def header_entry(self) -> dict:
        return {"spec": self.spec.to_dict(), "bias": self.bias is not None,
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def skeleton(cls, linear: nn.Linear, entry: dict) -> QuantLinear:
        """An empty QuantLinear for `linear`'s shape from a checkpoint entry (fields checked)."""
        unknown = sorted(set(entry) - {"spec", "bias", "in_features", "out_features"})
        if unknown:
            raise ValueError(f"unknown entry fields {unknown}")
        shape = (entry.get("in_features", linear.in_features), entry.get("out_features", linear.out_features))
        if shape != (linear.in_features, linear.out_features):
            raise ValueError(f"in/out_features {shape} do not match the model's Linear "
                             f"{(linear.in_features, linear.out_features)}")
        if not isinstance(entry.get("bias"), bool):
            raise ValueError(f"field 'bias' must be true or false, got {entry.get('bias')!r}")
        spec = QuantSpec.from_dict(entry.get("spec"))
        return cls(linear.in_features, linear.out_features, spec, bias=entry["bias"])

    # ---- nn.Module plumbing -------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, spec={describe_spec(self.spec)}"
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        """Let device moves through but keep format buffers (float32 scales, a kernel's FP8 weights) in their
        dtype under dtype casts."""
        names = _FLOAT32_BUFFERS + self.fixed_dtype_buffers
        kept = {n: self._buffers[n] for n in names if self._buffers.get(n) is not None}
        parked = self._buffers["qweight"] if self.codes_home is not None else None
        if parked is not None:  # moved by nothing: an empty stand-in goes through `fn`
            self._buffers["qweight"] = parked.new_empty(0)
        super()._apply(fn, recurse)
        if parked is not None:
            self.codes_home = self._buffers["qweight"].device
            self._buffers["qweight"] = parked
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype == old.dtype:
                continue
            if old.device == new.device:
                self._buffers[name] = old
            elif old.is_meta:
                self._buffers[name] = torch.empty_like(old, device=new.device)
            else:
                self._buffers[name] = old.to(new.device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Refuse, with a clear message, tensors whose dtype would be silently cast on copy; a kernel backend's
        buffers, computed from the old tensors, are dropped (with a warning: the layer runs the reference until
        `prepare_for_inference` is called again)."""
        for name in _UINT8_BUFFERS:
            t = state_dict.get(prefix + name)
            if t is not None and t.dtype != torch.uint8:
                error_msgs.append(f"{prefix}{name}: packed/integer buffer must be uint8, got {t.dtype}")
        for name in _FLOAT32_BUFFERS:
            t = state_dict.get(prefix + name)
            if t is not None and not t.is_floating_point():
                error_msgs.append(f"{prefix}{name}: must be a floating-point tensor, got {t.dtype}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if getattr(self, "kernel_buffers", ()) or self.gemm_group is not None:
            warnings.warn(
                f"{prefix.rstrip('.') or 'QuantLinear'}: loaded tensors replace those the {self.backend!r} backend's buffers were "
                "computed from; it runs the reference backend until prepare_for_inference is called again",
                stacklevel=2,
            )
            self.drop_kernel_buffers()


def describe_spec(spec: QuantSpec) -> str:
    """Short human form of a spec, e.g. `W4 g64 sym, A4 int g64 dyn, rank=32, smooth`."""
    w = "Wt" if spec.w_format == "ternary" else f"W{spec.w_bits}"
    w += f" g{spec.group_size}" if spec.group_size else " per-ch"
    w += " sym" if spec.symmetric else " asym"
    if spec.a_bits is None:
        a = "A16"
    else:
        a = f"A{spec.a_bits} {spec.a_format}"
        a += f" g{spec.a_group_size}" if spec.a_group_size else " per-tok"
        a += "" if spec.a_format == "fp8" else (" sym" if spec.a_symmetric else " asym")
        a += " dyn" if spec.a_dynamic else " static"
    parts = [w, a] + ([f"rank={spec.rank}"] if spec.rank else []) + (["smooth"] if spec.smooth else [])
    return ", ".join(parts)


def served_spec(spec: QuantSpec, bits: int) -> QuantSpec:
    """`spec` served at `bits`, a slice of its stored codes; a spec with one bit-width has no other slice."""
    if spec.stored_bits is None:
        raise ValueError(f"stores its codes at its one bit-width ({describe_spec(spec)}; spec.stored_bits unset)")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= spec.code_bits:
        raise ValueError(f"bits={bits!r} must be an int in 2..{spec.code_bits} (its stored bits)")
    return replace(spec, w_bits=bits)


def unpack_codes(qweight: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Stored codes (out, in) from the canonical packing: int8 signed (symmetric, ternary) or uint8."""
    stored = unpack(qweight, spec.code_bits, in_features)
    if not spec.symmetric:
        return stored
    return to_signed(stored, spec.code_bits, ternary=spec.w_format == "ternary")


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec, in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ŵ (out, in) in `dtype`: unpack, slice stored codes to the served bits, scale (and shift)."""
    codes = unpack_codes(qweight, spec, in_features)
    if spec.code_bits != spec.w_bits:
        codes = slice_codes(codes, spec.code_bits, spec.w_bits, extra_precision=spec.extra_precision)
    return dequantize(codes, scales, zeros, spec.group_size, dtype=dtype)


def quantize_activations(
    h: torch.Tensor, spec: QuantSpec, act_scale: torch.Tensor | None = None, act_zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize the (already smoothed) input per `spec`; returns h's dtype and shape.

    Dynamic scales are per token (`a_group_size=None`) or per token per channel group; static scales
    come from `act_scale` (and, asymmetric, `act_zero`): shape (1,) = one per tensor,
    (in // a_group_size,) = one per channel group shared by all tokens. FP8 is symmetric by nature
    (scale = absmax / 448), so `a_symmetric` does not apply to it. Gradients pass straight through.
    """
    if spec.a_bits is None:
        return h
    if spec.a_format == "fp8":
        scale = fp8_scale(h, spec.a_group_size) if spec.a_dynamic else act_scale
        return straight_through(h, fp8_dequantize(fp8_cast(h, scale), scale, h.dtype))
    qparams = None if spec.a_dynamic else (act_scale, act_zero)
    return fake_quantize(h, spec.a_bits, spec.a_group_size, spec.a_symmetric, qparams=qparams)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ValueError(f"{name} has non-finite values ({nan} NaN, {inf} inf)")


def _require(needed: bool, value: torch.Tensor | None, name: str, why: str) -> None:
    if needed and value is None:
        raise ValueError(f"{why} needs {name}= to be given")
    if not needed and value is not None:
        raise ValueError(f"{name}= was given but the spec does not use it")


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """dst.copy_(src) after checking the shape (scalars broadcast) and integer-vs-float kind."""
    if src.shape != dst.shape and src.numel() != 1:
        raise ValueError(f"{name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    if src.is_floating_point() != dst.is_floating_point():
        raise TypeError(f"{name} must be {dst.dtype}, got {src.dtype}")
    _check_finite(src, name)
    dst.copy_(src.detach())


# Filled by ditq.kernels (backend name → forward(module, x)); imported there to avoid a cycle.
BACKEND_FORWARDS: dict[str, Callable[[QuantLinear, torch.Tensor], torch.Tensor]] = {}
