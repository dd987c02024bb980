"""One registry from recipe type to the function that carries it out (torchao's pattern, kept small)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:
    from ditq.calib import CalibData
    from ditq.recipes import Recipe

# A method gets the full-precision model (read only), the Linears to quantize (name → that module's recipe,
# overrides applied) and optional calibration data, and returns name → new module for every one of them.
# It must not change the model: `api.quantize` swaps the modules in only once all of them are built, so a
# failure part-way leaves the caller's model as it was.
MethodFn = Callable[[nn.Module, "dict[str, Recipe]", "CalibData | None"], "dict[str, nn.Module]"]
R = TypeVar("R", bound="Recipe")

METHODS: dict[type, MethodFn] = {}


def register_method(recipe_type: type[R]) -> Callable[[MethodFn], MethodFn]:
    def decorate(fn: MethodFn) -> MethodFn:
        if recipe_type in METHODS:
            raise ValueError(f"a method is already registered for {recipe_type.__name__}")
        METHODS[recipe_type] = fn
        return fn

    return decorate


def method_for(recipe: Recipe) -> MethodFn:
    try:
        return METHODS[type(recipe)]
    except KeyError:
        known = sorted(t.__name__ for t in METHODS)
        raise ValueError(f"no method is registered for {type(recipe).__name__}; known recipes are {known}") from None
