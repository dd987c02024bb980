"""`quantize()` and `requantize()`: plan which modules a recipe targets, build every new module, then swap.

Nothing in the caller's model changes until every new module exists, so a failure part-way (a group size
that does not divide one layer, calibration data missing one layer) leaves the model as it was and a retry
works. `requantize` quantizes chosen modules of a full-precision model into a structural clone that shares
the FP tensors, so a search (Q-DiT) can try hundreds of assignments without copying the model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from fnmatch import fnmatchcase

from torch import nn

from ditq.adapters import adapter_for
from ditq.calib import CalibData
from ditq.methods.rtn import check_rtn, rtn_linear
from ditq.quant.modules import install, is_quantized
from ditq.quant.spec import QuantSpec
from ditq.recipes import Recipe
from ditq.registry import PLAN_CHECKS, method_for


def quantize(model: nn.Module, recipe: Recipe, calib: CalibData | None = None) -> nn.Module:
    """Quantize `model` in place with `recipe` and return it; on any error the model is unchanged.

    Every `nn.Linear` not matched by the recipe's skip patterns (None: the architecture's defaults, see
    `ditq.adapters`; `quantize_modulation` takes its adaLN modulation out of them) is handed to the method,
    each with its own recipe (overrides applied). Raises `ValueError` for a pattern that matches nothing, or
    when nothing is left to quantize.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a ditq recipe (e.g. ditq.RTN(...)), got {type(recipe).__name__}")
    targets = check_plan(model, recipe)
    built = method_for(recipe)(model, targets, calib)
    _check_built(model, targets, built, type(recipe).__name__)
    install(model, built)
    model.ditq_recipe = recipe.to_dict()
    return model


def plan(model: nn.Module, recipe: Recipe) -> dict[str, Recipe]:
    """Module name → the recipe that applies to it, for every Linear the recipe quantizes."""
    if is_quantized(model):
        raise ValueError("model is already quantized; start again from the full-precision model")
    names = [name for name, _ in model.named_modules() if name]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    adapter = adapter_for(model)
    skip = adapter.skip(recipe.quantize_modulation) if recipe.skip is None else recipe.skip
    source = f"the {adapter.name!r} adapter's default skip pattern" if recipe.skip is None else "skip pattern"
    for pattern in skip:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"{source} {pattern!r} matches no module of {type(model).__name__}")
    for pattern, _ in recipe.overrides:
        if not any(fnmatchcase(n, pattern) for n in linears):
            raise ValueError(f"overrides pattern {pattern!r} matches no Linear of {type(model).__name__}")
    targets = {
        name: recipe.for_module(name) for name in linears if not any(_matches(name, pattern) for pattern in skip)
    }
    if not targets:
        raise ValueError(f"recipe leaves no Linear to quantize in {type(model).__name__} (skip={skip})")
    return targets


def check_plan(model: nn.Module, recipe: Recipe) -> dict[str, Recipe]:
    """`plan`, checked as far as it can be without calibration data or weights: a method applies the recipe,
    every target's spec fits its layer's shape, and the method's own plan check passes. Raises ValueError
    naming the layer. Reads module names and shapes only, so callers run it before any calibration (and on
    a skeleton whose weights are not loaded yet)."""
    method_for(recipe)
    targets = plan(model, recipe)
    _check_targets(model, targets, type(recipe))
    return targets


def _check_targets(model: nn.Module, targets: dict[str, Recipe], recipe_type: type[Recipe]) -> None:
    """Every target's spec fits its layer's shape, and the method's own plan check passes."""
    check_fits(model, targets)
    check = PLAN_CHECKS.get(recipe_type)
    if check is not None:
        check(model, targets)


def check_fits(model: nn.Module, targets: Mapping[str, Recipe]) -> None:
    """Each target's spec against its layer's shape; the error names the layer."""
    for name, layer_recipe in targets.items():
        linear = model.get_submodule(name)
        try:
            layer_recipe.spec().check_fits(linear.in_features, linear.out_features)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


def requantize(
    fp_model: nn.Module, modules: Mapping[str, QuantSpec | Recipe], calib: CalibData | None = None
) -> nn.Module:
    """A copy of `fp_model` with only the named Linears quantized, each by its spec (round-to-nearest) or
    recipe (its method, with the overrides that match the name; skip patterns do not apply). `fp_model` is
    never changed, also not when an error is raised.

    The copy shares every tensor it keeps with `fp_model` (a structural clone: new module objects, the same
    storage), so it costs the quantized layers only. Do not modify the copy's float tensors in place.
    """
    if not modules:
        raise ValueError("requantize needs at least one module: {name: QuantSpec or recipe}")
    linears = {}
    for name, how in modules.items():
        module = fp_model.get_submodule(name) if _has_module(fp_model, name) else None
        if module is None:
            raise ValueError(f"requantize: {type(fp_model).__name__} has no module {name!r}")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"requantize: {name!r} is a {type(module).__name__}, not an nn.Linear")
        if not isinstance(how, (QuantSpec, Recipe)):
            raise TypeError(f"requantize: {name!r} must map to a QuantSpec or a recipe, got {type(how).__name__}")
        linears[name] = module
    specs = {name: how for name, how in modules.items() if isinstance(how, QuantSpec)}
    for name, spec in specs.items():
        check_rtn(name, linears[name], spec, calib, search=False)
    by_method: dict[type, dict[str, Recipe]] = {}
    for name, how in modules.items():
        if isinstance(how, Recipe):
            by_method.setdefault(type(how), {})[name] = how.for_module(name)
    for recipe_type, targets in by_method.items():  # all checked before any is built
        _check_targets(fp_model, targets, recipe_type)
    built: dict[str, nn.Module] = {}
    for recipe_type, targets in by_method.items():
        made = method_for(next(iter(targets.values())))(fp_model, targets, calib)
        _check_built(fp_model, targets, made, recipe_type.__name__)
        built |= made
    built |= {name: rtn_linear(name, linears[name], spec, calib) for name, spec in specs.items()}
    clone = shallow_clone(fp_model)
    install(clone, built)
    return clone


def shallow_clone(model: nn.Module) -> nn.Module:
    """New module objects (own hook, child, parameter and buffer dicts) over the same tensor storage.

    Parameters are new `nn.Parameter` objects on the same data, so `clone.to(...)` or a swap in the clone
    never reaches the original; shared submodules stay shared.
    """
    memo: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}

    def parameter(p: nn.Parameter) -> nn.Parameter:  # tied parameters stay tied in the clone
        if id(p) not in params:
            params[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        return params[id(p)]

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = copy.copy(module)
        memo[id(module)] = new
        for key, value in vars(module).items():
            if isinstance(value, (dict, set, list)):
                new.__dict__[key] = copy.copy(value)  # hook dicts, config dicts: the clone's own
        new._parameters = {k: None if p is None else parameter(p) for k, p in module._parameters.items()}
        new._buffers = {k: None if b is None else b.detach() for k, b in module._buffers.items()}
        new._modules = {k: None if m is None else clone(m) for k, m in module._modules.items()}
        return new

    return clone(model)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_built(model: nn.Module, targets: Mapping[str, Recipe], built: Mapping[str, nn.Module], method: str) -> None:
    """A method must return one new module per target, of the target's shape; checked before any swap."""
    if set(built) != set(targets):
        raise RuntimeError(
            f"the {method} method returned modules for {sorted(set(built) ^ set(targets))} that do not match "
            "its targets"
        )
    for name, module in built.items():
        linear = model.get_submodule(name)
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if shape != (linear.in_features, linear.out_features):
            raise RuntimeError(f"the {method} method built {name!r} with shape {shape}, expected "
                               f"{(linear.in_features, linear.out_features)}")  # fmt: skip


def _matches(name: str, pattern: str) -> bool:
    """A pattern that names a module also covers everything inside it (`final_layer*` ⊃ `final_layer.linear`)."""
    return fnmatchcase(name, pattern) or any(
        fnmatchcase(name[: i], pattern) for i, ch in enumerate(name) if ch == "."
    )
