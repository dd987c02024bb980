"""Quantization core: the spec, pure quantizers, bit packing and the `QuantLinear` module."""

from ditq.quant.clip_search import DEFAULT_CLIP_GRID, clip_search
from ditq.quant.packing import pack, packed_cols, signed_offset, slot_bits, to_signed, to_unsigned, unpack
from ditq.quant.primitives import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_FLOOR,
    compute_qparams,
    dequantize,
    fake_quantize,
    fp8_cast,
    fp8_dequantize,
    fp8_quantize,
    fp8_scale,
    per_tensor_qparams,
    qrange,
    quantize,
    straight_through,
    ternary_absmean,
)
from ditq.quant.qlinear import QuantLinear, describe_spec
from ditq.quant.spec import QuantSpec

__all__ = [
    "DEFAULT_CLIP_GRID",
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FLOOR",
    "QuantLinear",
    "QuantSpec",
    "clip_search",
    "compute_qparams",
    "dequantize",
    "describe_spec",
    "fake_quantize",
    "fp8_cast",
    "fp8_dequantize",
    "fp8_quantize",
    "fp8_scale",
    "pack",
    "packed_cols",
    "per_tensor_qparams",
    "qrange",
    "quantize",
    "signed_offset",
    "slot_bits",
    "straight_through",
    "ternary_absmean",
    "to_signed",
    "to_unsigned",
    "unpack",
]
