"""`QuantSpec`: the typed description of one quantized Linear.

Every method produces `QuantLinear`s that carry a `QuantSpec`; checkpoints and kernels read nothing
else, which is what keeps them method-agnostic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

WeightFormat = Literal["int", "ternary"]
ActFormat = Literal["int", "fp8"]

WEIGHT_FORMATS = ("int", "ternary")
ACT_FORMATS = ("int", "fp8")


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear's weights (and optionally its input activations) are quantized.

    Granularity is given as a group size along the input (last) dimension: `group_size=None` means one
    scale per output channel, an int `g` means one scale per output channel per `g` input channels.
    Activations: `a_group_size=None` means one scale per token.
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

    def __post_init__(self) -> None:
        if self.w_format not in WEIGHT_FORMATS:
            raise ValueError(f"w_format={self.w_format!r} is not one of {WEIGHT_FORMATS}")
        if self.w_format == "ternary":
            if self.w_bits != 2:
                raise ValueError(f"ternary weights are stored in 2 bits; got w_bits={self.w_bits}")
            if not self.symmetric:
                raise ValueError("ternary weights are symmetric; got symmetric=False")
        elif not 2 <= self.w_bits <= 8:
            raise ValueError(f"w_bits={self.w_bits} is outside the supported range 2..8")
        _check_group("group_size", self.group_size)
        if self.a_format not in ACT_FORMATS:
            raise ValueError(f"a_format={self.a_format!r} is not one of {ACT_FORMATS}")
        if self.a_bits is not None:
            if self.a_format == "fp8" and self.a_bits != 8:
                raise ValueError(f"fp8 activations have 8 bits; got a_bits={self.a_bits}")
            if not 2 <= self.a_bits <= 8:
                raise ValueError(f"a_bits={self.a_bits} is outside the supported range 2..8 (or None)")
        _check_group("a_group_size", self.a_group_size)
        if self.rank < 0:
            raise ValueError(f"rank={self.rank} must be >= 0")

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits is not None

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantSpec keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _check_group(name: str, group: int | None) -> None:
    if group is not None and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise ValueError(f"{name}={group!r} must be a positive int or None")
