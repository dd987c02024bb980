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
# A plan check gets the same model and targets before any calibration and raises ValueError, naming the layer,
# for whatever the method would refuse whatever the calibration data. It reads module names and shapes only:
# it also runs on a skeleton whose weights are not loaded yet (diffusers' `from_pretrained`).
PlanCheckFn = Callable[[nn.Module, "dict[str, Recipe]"], None]
R = TypeVar("R", bound="Recipe")

METHODS: dict[type, MethodFn] = {}
PLAN_CHECKS: dict[type, PlanCheckFn] = {}


def register_method(recipe_type: type[R], *, check_plan: PlanCheckFn | None = None
                    ) -> Callable[[MethodFn], MethodFn]:
    """Register the decorated function as `recipe_type`'s method, with its plan check beyond the spec's shapes
    (`ditq.api.check_plan` checks every target's `spec()` against its layer for all methods)."""
    def decorate(fn: MethodFn) -> MethodFn:
        if recipe_type in METHODS:
            raise ValueError(f"a method is already registered for {recipe_type.__name__}")
        METHODS[recipe_type] = fn
        if check_plan is not None:
            PLAN_CHECKS[recipe_type] = check_plan
        return fn

    return decorate


def method_for(recipe: Recipe) -> MethodFn:
    if recipe.needs() == "training":
        raise ValueError(f"{type(recipe).__name__} recipes are trained, not applied to a model: use `ditq train "
                         "--recipe ...` (or ditq.prepare → train → ditq.convert)")
    try:
        return METHODS[type(recipe)]
    except KeyError:
        known = sorted(t.__name__ for t in METHODS)
        raise ValueError(f"no method is registered for {type(recipe).__name__}; known recipes are {known}") from None
