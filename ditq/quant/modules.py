"""The kinds of quantized module a model may hold, and the one way to swap them in for `nn.Linear`s.

A checkpoint lists, per quantized module, its kind and what its `header_entry()` returned; loading
builds the model, then `swap_in` replaces each named Linear by `kind.skeleton(linear, entry)` before the
tensors are assigned. `io.load`, and later loaders (diffusers), all go through `swap_in`.

A kind is a class with `kind: ClassVar[str]`, `header_entry(self) -> dict` (JSON data) and
`skeleton(cls, linear, entry) -> nn.Module` (empty module of the right shapes; raises ValueError naming
the bad field); it registers with `@register_quant_module`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

__all__ = ["QUANT_MODULES", "QuantModule", "install", "is_quantized", "quant_module_entries",
           "register_quant_module", "swap_in"]


class QuantModule(Protocol):
    kind: str

    def header_entry(self) -> dict[str, Any]: ...

    @classmethod
    def skeleton(cls, linear: nn.Linear, entry: Mapping[str, Any]) -> nn.Module: ...


QUANT_MODULES: dict[str, type] = {}


def register_quant_module(cls: type) -> type:
    """Class decorator: make `cls` a module kind that checkpoints can name."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} needs a class attribute kind: str to register")
    if kind in QUANT_MODULES and QUANT_MODULES[kind] is not cls:
        raise ValueError(f"quantized module kind {kind!r} is already registered by {QUANT_MODULES[kind].__name__}")
    QUANT_MODULES[kind] = cls
    return cls


def is_quantized(model: nn.Module) -> bool:
    """True when any module of `model` is a registered quantized kind."""
    kinds = tuple(QUANT_MODULES.values())
    return any(isinstance(m, kinds) for m in model.modules())


def quant_module_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module name → {"kind": …, **header_entry()} for every quantized module (what a checkpoint lists)."""
    kinds = tuple(QUANT_MODULES.values())
    return {name: {"kind": type(m).kind, **m.header_entry()}
            for name, m in model.named_modules() if isinstance(m, kinds)}


def swap_in(model: nn.Module, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace each named `nn.Linear` by the skeleton its entry describes (all checked before any swap).

    Raises ValueError naming the module and the field at fault; on error the model is unchanged.
    """
    built = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"module {name!r}: its entry must be a mapping, got {type(entry).__name__}")
        kind = entry.get("kind")
        if kind not in QUANT_MODULES:
            raise ValueError(f"module {name!r}: kind={kind!r} is not one of {sorted(QUANT_MODULES)}")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"module {name!r} does not exist in {type(model).__name__}") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"module {name!r} is a {type(linear).__name__}, not a Linear")
        fields = {k: v for k, v in entry.items() if k != "kind"}
        try:
            built[name] = QUANT_MODULES[kind].skeleton(linear, fields)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"module {name!r}: {err}") from err
    install(model, built)


def install(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put each module at its name in `model`. Each learns that name (`layer_name`): a module does not know
    where it sits, and the errors of its forward must say which layer of the model was called wrongly."""
    for name, module in modules.items():
        module.layer_name = name
        model.set_submodule(name, module)
