"""One registry from recipe type to the function that carries it out (torchao's pattern, kept small)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:
    from ditq.calib import CalibData
    from ditq.recipes import Recipe

# A method gets the model, the modules to quantize (name → that module's recipe, overrides applied)
# and optional calibration data; it replaces those modules in place and returns the model.
MethodFn = Callable[[nn.Module, "dict[str, Recipe]", "CalibData | None"], nn.Module]
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
