"""`QuantSpec`: the typed description of one quantized Linear.

Every method produces quantized modules that carry a `QuantSpec`; checkpoints and kernels read nothing
else, which is what keeps them method-agnostic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

from ditq.quant.packing import LAYOUTS, slot_bits

WeightFormat = Literal["int", "ternary"]
ActFormat = Literal["int", "fp8"]

WEIGHT_FORMATS = ("int", "ternary")
ACT_FORMATS = ("int", "fp8")
SCALE_BITS = 32  # smoothing vectors and static activation scales are stored as float32
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # weight scales: `QuantSpec.scale_dtype`
ZERO_BITS = 8  # zero points are uint8


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear's weights (and optionally its input activations) are quantized.

    Granularity is a group size along the input (last) dimension: `group_size=None` means one scale per
    output channel, an int `g` one scale per output channel per `g` input channels. Activations:
    `a_group_size=None` means one scale per token.

    `w_bits` are the bits the layer is *served* at; `stored_bits` (None = `w_bits`) are the bits its
    codes are stored at. With `stored_bits=8, w_bits=4` the layer keeps int8 codes and runs on their
    four most significant bits (MatQuant's nested slices, SPEC §6). `extra_precision` gives a 2-bit slice
    of wider codes a fifth level, +2^(stored−1), the top bucket that the nested slice clamps (MatQuant's
    extra-precision int2, `ditq.quant.primitives.slice_codes`): the stored codes are the same, the served
    2-bit slice takes 3-bit codes and is no longer a point of the stored grid.
    `input_group` names the layers that read the same input tensor (q/k/v): they share one smoothing
    vector, one activation quantization and one low-rank down-projection.
    `layout` names how `qweight` is packed: checkpoints always hold "canonical"; a kernel converter may
    re-pack a loaded model in place and records its layout here. `scale_dtype` is how the weight scales are
    stored: "float16" halves their cost (0.25 instead of 0.5 bit per weight at g64); codes are computed
    against the rounded scales.
    """

    w_bits: int = 8
    w_format: WeightFormat = "int"
    group_size: int | None = None
    symmetric: bool = True
    a_bits: int | None = None
    a_format: ActFormat = "int"
    a_group_size: int | None = None
    a_symmetric: bool = True
    a_dynamic: bool = True
    rank: int = 0
    smooth: bool = False
    input_group: str | None = None
    stored_bits: int | None = None
    layout: str = "canonical"
    scale_dtype: str = "float32"
    extra_precision: bool = False

    def __post_init__(self) -> None:
        _check_choice("w_format", self.w_format, WEIGHT_FORMATS)
        _check_int("w_bits", self.w_bits, 2, 8)
        for name in ("symmetric", "a_symmetric", "a_dynamic", "smooth", "extra_precision"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.w_format == "ternary":
            if self.w_bits != 2:
                raise ValueError(f"ternary weights are stored in 2 bits; got w_bits={self.w_bits}")
            if not self.symmetric:
                raise ValueError("ternary weights are symmetric; got symmetric=False")
        if self.stored_bits is not None:
            _check_int("stored_bits", self.stored_bits, self.w_bits, 8)
            if self.w_format == "ternary" or not self.symmetric:
                raise ValueError("stored_bits (nested bit-widths) applies to symmetric int weights only")
        if self.extra_precision and (self.stored_bits is None or self.stored_bits <= 2):
            raise ValueError(f"extra_precision widens the 2-bit slice of wider stored codes; got stored_bits="
                             f"{self.stored_bits} (set stored_bits > 2, e.g. 8)")
        _check_group("group_size", self.group_size)
        _check_choice("a_format", self.a_format, ACT_FORMATS)
        if self.a_bits is not None:
            _check_int("a_bits", self.a_bits, 2, 8)
            if self.a_format == "fp8" and self.a_bits != 8:
                raise ValueError(f"fp8 activations have 8 bits; got a_bits={self.a_bits}")
        elif self.a_format != "int" or self.a_group_size is not None or not self.a_dynamic:
            raise ValueError("a_format, a_group_size and a_dynamic=False need activation bits (a_bits)")
        _check_group("a_group_size", self.a_group_size)
        _check_int("rank", self.rank, 0, None)
        if self.input_group is not None and (not isinstance(self.input_group, str) or not self.input_group):
            raise ValueError(f"input_group={self.input_group!r} must be a non-empty string or None")
        _check_choice("layout", self.layout, tuple(LAYOUTS))
        _check_choice("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits is not None

    @property
    def code_bits(self) -> int:
        """Bits of the stored codes (`stored_bits`, else `w_bits`)."""
        return self.w_bits if self.stored_bits is None else self.stored_bits

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def store_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` (float32) rounded as it will be stored, floored at the stored dtype's smallest normal."""
        dtype = self.scale_torch_dtype
        return scale.clamp_min(torch.finfo(dtype).tiny).to(dtype).float()

    def check_fits(self, in_features: int, out_features: int) -> None:
        """Raise if this spec cannot describe a Linear of the given size."""
        for name, group in (("group_size", self.group_size), ("a_group_size", self.a_group_size)):
            if group is not None and in_features % group != 0:
                raise ValueError(
                    f"{name}={group} does not divide in_features={in_features}; "
                    f"choose a divisor of {in_features} or None (per channel/token)"
                )
        if self.rank > min(in_features, out_features):
            raise ValueError(
                f"rank={self.rank} exceeds min(in_features, out_features)={min(in_features, out_features)}"
            )

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def bits_per_weight(self, in_features: int, out_features: int, float_bits: int = 16) -> float:
        """Stored bits per weight of an (out, in) layer: codes, scales, zeros, smoothing and low-rank factors.

        Codes count at their packed slot width (5–7-bit codes take a byte), scales at `scale_dtype`, the
        smoothing vector at 32 bits, zero points at 8, the low-rank factors at `float_bits`. The bias is not a
        weight and is left out.
        """
        self.check_fits(in_features, out_features)
        groups = out_features * self.n_groups(in_features)
        total = in_features * out_features * slot_bits(self.code_bits)
        scale_bits = torch.finfo(self.scale_torch_dtype).bits
        total += groups * (scale_bits + (0 if self.symmetric else ZERO_BITS))
        total += in_features * SCALE_BITS if self.smooth else 0
        total += self.rank * (in_features + out_features) * float_bits
        return total / (in_features * out_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        if not isinstance(data, dict):
            raise TypeError(f"a QuantSpec is described by a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantSpec keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _check_int(name: str, value: Any, lo: int, hi: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value!r} must be an int in {span}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_group(name: str, group: Any) -> None:
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise ValueError(f"{name}={group!r} must be a positive int or None")
