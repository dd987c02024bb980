"""`quantize()`: pick the modules a recipe targets, then hand them to the method registered for it."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from ditq.calib import CalibData
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import DEFAULT_SKIP, Recipe
from ditq.registry import method_for


def quantize(model: nn.Module, recipe: Recipe, calib: CalibData | None = None) -> nn.Module:
    """Quantize `model` in place with `recipe` and return it.

    Every `nn.Linear` not matched by `recipe.skip` is handed to the method, each with its own recipe
    (overrides applied). Raises `ValueError` for a pattern that matches nothing, or when nothing is left
    to quantize.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a ditq recipe (e.g. ditq.RTN(...)), got {type(recipe).__name__}")
    method = method_for(recipe)
    targets = plan(model, recipe)
    model = method(model, targets, calib)
    model.ditq_recipe = recipe.to_dict()
    return model


def plan(model: nn.Module, recipe: Recipe) -> dict[str, Recipe]:
    """Module name → the recipe that applies to it, for every Linear the recipe quantizes."""
    names = [name for name, _ in model.named_modules() if name]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized; start again from the full-precision model")
    for pattern in recipe.skip:
        if pattern not in DEFAULT_SKIP and not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"skip pattern {pattern!r} matches no module of {type(model).__name__}")
    for pattern in recipe.overrides:
        if not any(fnmatchcase(n, pattern) for n in linears):
            raise ValueError(f"overrides pattern {pattern!r} matches no Linear of {type(model).__name__}")
    targets = {
        name: recipe.for_module(name)
        for name in linears
        if not any(_matches(name, pattern) for pattern in recipe.skip)
    }
    if not targets:
        raise ValueError(f"recipe leaves no Linear to quantize in {type(model).__name__} (skip={recipe.skip})")
    return targets


def _matches(name: str, pattern: str) -> bool:
    """A pattern that names a module also covers everything inside it (`final_layer*` ⊃ `final_layer.linear`)."""
    return fnmatchcase(name, pattern) or any(
        fnmatchcase(name[: i], pattern) for i, ch in enumerate(name) if ch == "."
    )
