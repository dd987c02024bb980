"""Recipes: frozen, hashable, self-validating configs that name a method and its parameters.

A recipe says *what* to do; the method registered for its type (see `registry.py`) says *how*.
Module selection is by fnmatch patterns over module names (`blocks.*.attn.qkv`). `skip` lists the
modules that stay in high precision (None: the model's adapter's defaults, see `ditq.adapters`, less the
adaLN modulation Linears when `quantize_modulation` is set: so a preset fits any model);
`overrides` changes fields for the modules a pattern matches (later patterns win), given as a mapping
`{"blocks.0.*": {"w_bits": 8}}` and stored as a tuple of `(pattern, ((field, value), ...))` pairs, so
a recipe can be a dict key and the caller's dict cannot change it afterwards.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from ditq.quant.spec import QuantSpec

Overrides = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
Needs = Literal["nothing", "calibration", "training"]

_RECIPE_TYPES: dict[str, type[Recipe]] = {}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Fields every recipe shares: which modules to leave alone and per-pattern field changes."""

    method: ClassVar[str] = ""
    skip: tuple[str, ...] | None = None
    quantize_modulation: bool = False
    overrides: Overrides = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _RECIPE_TYPES[cls.method] = cls

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", _patterns(self.skip))
        object.__setattr__(self, "overrides", _frozen_overrides(self.overrides))
        _check_type(f"{type(self).__name__}.quantize_modulation", self.quantize_modulation, bool)
        if self.quantize_modulation and self.skip is not None:
            raise ValueError("quantize_modulation=True edits the adapter's default skips (skip=None); an explicit "
                             "skip list says on its own what stays in high precision")
        hints = typing.get_type_hints(type(self))
        for name in self.tunable_fields():
            _check_type(f"{type(self).__name__}.{name}", getattr(self, name), hints[name])
        tunable = self.tunable_fields()
        for pattern, changes in self.overrides:
            unknown = sorted({key for key, _ in changes} - tunable)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown fields {unknown}; "
                    f"{type(self).__name__} fields are {sorted(tunable)}"
                )
            replace(self, overrides=(), **dict(changes))  # validates the overridden values now

    def needs(self) -> Needs:
        """What must come before quantizing with this recipe: "nothing", "calibration" (`calib=`, from
        `ditq.calibrate`) or "training" (a QAT recipe: `ditq.prepare` → train → `ditq.convert`)."""
        return "calibration"

    @classmethod
    def tunable_fields(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"skip", "quantize_modulation", "overrides"}

    def quant_spec(self, **changes: Any) -> QuantSpec:
        """The `QuantSpec` made of this recipe's fields that a spec has, with `changes` on top."""
        names = {f.name for f in fields(QuantSpec)}
        return QuantSpec(**({n: getattr(self, n) for n in names if hasattr(self, n)} | changes))

    def variants(self) -> list[Recipe]:
        """The recipe and each override applied on its own: every value a module's recipe may take per field."""
        return [self, *(replace(self, overrides=(), **dict(changes)) for _, changes in self.overrides)]

    def for_module(self, name: str) -> Recipe:
        """The recipe with every override whose pattern matches `name` applied, in order."""
        changes: dict[str, Any] = {}
        for pattern, values in self.overrides:
            if fnmatchcase(name, pattern):
                changes.update(values)
        return replace(self, overrides=(), **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data that `recipe_from_dict` turns back into an equal recipe."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["skip"] = None if self.skip is None else list(self.skip)
        data["overrides"] = {pattern: dict(changes) for pattern, changes in self.overrides}
        return {"method": self.method, **data}


def _patterns(skip: Any) -> tuple[str, ...] | None:
    if skip is None:
        return None
    if isinstance(skip, str) or not isinstance(skip, (list, tuple)):
        raise TypeError(f"skip must be a list of module-name patterns or None, got {skip!r}")
    if not all(isinstance(p, str) and p for p in skip):
        raise TypeError(f"skip patterns must be non-empty strings, got {list(skip)!r}")
    return tuple(skip)


def _frozen_overrides(overrides: Any) -> Overrides:
    """Mapping or pair tuple → `((pattern, ((field, value), ...)), ...)`, fields sorted so equal recipes hash equal."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    elif isinstance(overrides, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in overrides):
        items = list(overrides)
    else:
        raise TypeError(f"overrides must be a mapping {{pattern: {{field: value}}}}, got {overrides!r}")
    frozen = []
    for pattern, changes in items:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"overrides patterns must be non-empty strings, got {pattern!r}")
        if isinstance(changes, Mapping):
            changes = tuple(changes.items())
        if not isinstance(changes, tuple) or not all(isinstance(c, tuple) and len(c) == 2 for c in changes):
            raise TypeError(f"overrides[{pattern!r}] must be a mapping of field changes, got {changes!r}")
        keys = [key for key, _ in changes]
        if len(set(keys)) != len(keys) or not all(isinstance(key, str) for key in keys):
            raise TypeError(f"overrides[{pattern!r}] must name each field once, got {changes!r}")
        frozen.append((pattern, tuple(sorted(changes, key=lambda change: change[0]))))
    patterns = [pattern for pattern, _ in frozen]
    repeated = sorted({p for p in patterns if patterns.count(p) > 1})
    if repeated:
        raise ValueError(f"overrides patterns {repeated} appear more than once")
    return tuple(frozen)


def _check_type(where: str, value: Any, hint: Any) -> None:
    """Raise TypeError naming `where` unless `value` fits `hint` (int, float, bool, str, None, unions, Literal).

    bool is not an int here, and an int is a float, as users mean it."""
    if not _fits(value, hint):
        raise TypeError(f"{where}={value!r} ({type(value).__name__}) must be {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is tuple:  # tuple[X, ...]
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a tuple of {_describe(typing.get_args(hint)[0])}"
    return "None" if hint is type(None) else hint.__name__


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    """Build a recipe from plain data (`{"method": "rtn", "w_bits": 4, ...}`); any bad key or value
    is a ValueError naming it (a wrong type in data is a bad value)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a recipe must be a mapping, got {type(data).__name__}")
    data = dict(data)
    method = data.pop("method", None)
    if method not in _RECIPE_TYPES:
        raise ValueError(f"unknown recipe method {method!r}; known methods are {sorted(_RECIPE_TYPES)}")
    cls = _RECIPE_TYPES[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
    if isinstance(data.get("skip"), list):
        data["skip"] = tuple(data["skip"])
    try:
        return cls(**data)
    except TypeError as err:
        raise ValueError(str(err)) from err


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """A recipe from a preset name (`w4a8`), a JSON/YAML file, or a mapping. File errors name the file."""
    if isinstance(source, Mapping):
        return recipe_from_dict(source)
    text = str(source)
    if text.lower() in PRESETS:
        return PRESETS[text.lower()]
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"recipe {path} is a directory, not a recipe file")
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {text!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing file"
        )
    data = _read_recipe_file(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a recipe file must hold a mapping, got {type(data).__name__}")
    try:
        return recipe_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _read_recipe_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: a recipe file must be UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"{path}: not valid YAML{where}: {problem}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err


@dataclass(frozen=True, kw_only=True)
class RTN(Recipe):
    """Round-to-nearest: weights quantized once from their own range (ternary: absmean, no training),
    activations on the fly (int, or FP8 e4m3 for the Hopper path)."""

    method: ClassVar[str] = "rtn"
    w_bits: int = 8
    w_format: Literal["int", "ternary"] = "int"
    group_size: int | None = None
    symmetric: bool = True
    a_bits: int | None = 8
    a_format: Literal["int", "fp8"] = "int"
    scale_dtype: Literal["float32", "float16"] = "float32"
    a_group_size: int | None = None
    a_symmetric: bool = True
    a_dynamic: bool = True
    clip_search: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec()  # QuantSpec validates bits, formats and group sizes
        if not self.a_dynamic and self.a_bits is None:
            raise ValueError("a_dynamic=False (static activation scales) needs a_bits")
        if not self.a_dynamic and not self.a_symmetric:
            raise ValueError("a_dynamic=False supports symmetric activations only (a_symmetric=True)")
        if self.clip_search and self.w_format == "ternary":
            raise ValueError("clip_search does not apply to ternary (absmean) weights")

    def spec(self) -> QuantSpec:
        return self.quant_spec()

    def needs(self) -> Needs:
        """Static activation scales (here or in an override) come from calibration; everything else from the
        weights alone."""
        return "calibration" if any(not r.a_dynamic for r in self.variants()) else "nothing"



# The baseline rows every method is compared against (the RTN table of docs/results.md).
PRESETS: dict[str, Recipe] = {
    "w8a8": RTN(w_bits=8, a_bits=8),
    "w6a8": RTN(w_bits=6, a_bits=8),
    "w4a8": RTN(w_bits=4, group_size=128, a_bits=8),
    "w4a16": RTN(w_bits=4, group_size=128, a_bits=None),
    "w4a4": RTN(w_bits=4, group_size=64, a_bits=4, a_group_size=64),
    # per-channel int4 + per-token FP8 activations: the layout the "fp8" kernel backends run on Hopper
    "w4a8-fp8": RTN(w_bits=4, a_bits=8, a_format="fp8"),
}


def register_preset(name: str, recipe: Recipe) -> Recipe:
    """Add a named recipe (`ditq quantize --recipe NAME`); each method file registers its own presets."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"preset {name!r} must be a recipe, got {type(recipe).__name__}")
    key = name.lower()
    if key in PRESETS:
        raise ValueError(f"a preset named {key!r} already exists")
    PRESETS[key] = recipe
    return recipe
