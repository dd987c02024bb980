"""Recipes: frozen, self-validating configs that name a method and its parameters.

A recipe says *what* to do; the method registered for its type (see `registry.py`) says *how*.
Module selection is by fnmatch patterns over module names (`blocks.*.attn.qkv`). `skip` lists the
modules that stay in high precision; `overrides` changes fields for the modules a pattern matches
(later patterns win), e.g. `{"blocks.0.*": {"w_bits": 8}}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

from ditq.quant.spec import QuantSpec

# Embedders, the final layer and the adaLN modulation stay in high precision unless a method says otherwise
# (SPEC §2; Q-DiT only touches the transformer blocks' attention and MLP linears).
DEFAULT_SKIP: tuple[str, ...] = (
    "x_embedder*",
    "t_embedder*",
    "y_embedder*",
    "final_layer*",
    "*adaLN_modulation*",
)

_RECIPE_TYPES: dict[str, type[Recipe]] = {}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Fields every recipe shares: which modules to leave alone and per-pattern field changes."""

    method: ClassVar[str] = ""
    skip: tuple[str, ...] = DEFAULT_SKIP
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _RECIPE_TYPES[cls.method] = cls

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))
        tunable = self.tunable_fields()
        for pattern, changes in self.overrides.items():
            if not isinstance(changes, Mapping):
                raise TypeError(f"overrides[{pattern!r}] must be a mapping of field changes, got {changes!r}")
            unknown = sorted(set(changes) - tunable)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown fields {unknown}; "
                    f"{type(self).__name__} fields are {sorted(tunable)}"
                )
            replace(self, overrides={}, **changes)  # validates the overridden values now, not at quantize time

    @classmethod
    def tunable_fields(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"skip", "overrides"}

    def for_module(self, name: str) -> Recipe:
        """The recipe with every override whose pattern matches `name` applied, in order."""
        changes: dict[str, Any] = {}
        for pattern, values in self.overrides.items():
            if fnmatchcase(name, pattern):
                changes.update(values)
        return replace(self, overrides={}, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skip"] = list(self.skip)
        data["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return {"method": self.method, **data}


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """Build a recipe from plain data (`{"method": "rtn", "w_bits": 4, ...}`), naming any bad key."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in _RECIPE_TYPES:
        raise ValueError(f"unknown recipe method {method!r}; known methods are {sorted(_RECIPE_TYPES)}")
    cls = _RECIPE_TYPES[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
    if "skip" in data:
        data["skip"] = tuple(data["skip"])
    return cls(**data)


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """A recipe from a preset name (`w4a8`), a JSON/YAML file, or a mapping."""
    if isinstance(source, Mapping):
        return recipe_from_dict(source)
    text = str(source)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {text!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing file"
        )
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text())
    else:
        data = json.loads(path.read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a recipe file must hold a mapping, got {type(data).__name__}")
    return recipe_from_dict(data)


@dataclass(frozen=True, kw_only=True)
class RTN(Recipe):
    """Round-to-nearest: weights quantized once from their own range, activations on the fly."""

    method: ClassVar[str] = "rtn"
    w_bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    a_bits: int | None = 8
    a_group_size: int | None = None
    a_symmetric: bool = True
    a_dynamic: bool = True
    clip_search: bool = False

    def __post_init__(self) -> None:
        self.spec()  # QuantSpec validates bits, formats and group sizes
        if not self.a_dynamic and self.a_bits is None:
            raise ValueError("a_dynamic=False (static activation scales) needs a_bits")
        if not self.a_dynamic and not self.a_symmetric:
            raise ValueError("a_dynamic=False supports symmetric activations only (a_symmetric=True)")
        super().__post_init__()

    def spec(self) -> QuantSpec:
        return QuantSpec(
            w_bits=self.w_bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            a_bits=self.a_bits,
            a_group_size=self.a_group_size,
            a_symmetric=self.a_symmetric,
            a_dynamic=self.a_dynamic,
        )


# The baseline rows every method is compared against (issue 4's table).
PRESETS: dict[str, Recipe] = {
    "w8a8": RTN(w_bits=8, a_bits=8),
    "w6a8": RTN(w_bits=6, a_bits=8),
    "w4a8": RTN(w_bits=4, group_size=128, a_bits=8),
    "w4a16": RTN(w_bits=4, group_size=128, a_bits=None),
    "w4a4": RTN(w_bits=4, group_size=64, a_bits=4, a_group_size=64),
}
