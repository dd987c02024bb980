"""SVDQuant (Li et al., arXiv 2411.05007): absorb outliers with a 16-bit low-rank branch, quantize the rest.

For one input group (layers that read the same input X; one layer alone is a group of one) with
weights W = [W_1; …; W_k] (out, in):

    1. smoothing     s = max|X|^α / max|W|^β, searched over a grid (α, β); Ŵ = W·diag(s), h = X / s
    2. low rank      L1 L2 = best rank-r approximation of Ŵ (SVD; randomized for wide layers)
                     R = Ŵ − (L1 L2)ᵀ
    3. quantize      Q(R): int w_bits, symmetric, per group of `group_size` inputs (RTN, or GPTQ on R with
                     the Hessian of the smoothed inputs h)
                     Q(h): int a_bits per token group (W4A4) or FP8 per token (W4A8-FP8)
    4. the output    y = Q(h)·Q(R)ᵀ + (h·L1)·L2
    (α, β) is the grid point with the least output error ‖Q(h)Q(R)ᵀ + hL1L2 − XWᵀ‖² on the calibration rows,
    each candidate with its own branch (the reference searches smoothing with the branch in place).
    Optional refinement: L ← SVD_r(Ŵ − Q(Ŵ − L)) while the output error falls.

A group stores one s, one down-projection L1 (in, r) and per layer its slice of L2 (r, out_i):
`QuantSpec.input_group` ties them and `ditq.io` writes the shared tensors once. Each group is computed
from its own full-precision weights and calibration rows only, so groups run one at a time on the device
(bounded memory) and a killed run resumes from `ditq.methods.layerwise` files with identical results.
The ablations are recipe fields: `smooth=False` (low-rank only), `rank=0` (smoothing only: SmoothQuant
with a searched α), both off (RTN with this quantizer), `gptq=True`, `refine_iters`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.api import check_plan
from ditq.calib import CalibData
from ditq.calib.reservoir import layer_generator
from ditq.checks import naming_layer
from ditq.kernels.reference import quantize_activations
from ditq.methods.gptq import gptq, hessian
from ditq.methods.layerwise import LayerwiseState, unit_fingerprint
from ditq.methods.smoothing import DEFAULT_ALPHAS, WeightExponent, smooth_candidates
from ditq.quant.modules import install
from ditq.quant.primitives import compute_qparams, dequantize, quantize
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.recipes import Recipe, register_preset
from ditq.registry import register_method
from ditq.threads import map_tasks, torch_threads

__all__ = ["SVDQuant", "GroupResult", "low_rank_branch", "svdquant_group", "svdquant_modules", "svdquant_quantize"]


@dataclass(frozen=True, kw_only=True)
class SVDQuant(Recipe):
    """SVDQuant: smoothing + low-rank branch + 4-bit residual; see the module docstring for each field's role.

    `a_group_size`: "auto" follows the activation format: per token for FP8 (the Hopper kernels' layout),
    groups of 64 channels for int, nothing without activation quantization (`a_bits=None`).
    `input_groups`: layers that read one input (None: the architecture adapter's groups; generic models: none).
    `search_rows`: calibration rows per group scored in the α search (GPTQ's Hessian uses all of them).
    `svd`: "exact", "randomized" (seeded range finder) or "auto" (randomized when the smaller side > 512).
    """

    method: ClassVar[str] = "svdquant"
    w_bits: int = 4
    group_size: int | None = 64
    a_bits: int | None = 4
    a_format: Literal["int", "fp8"] = "int"
    a_group_size: int | None | Literal["auto"] = "auto"
    rank: int = 32
    scale_dtype: Literal["float32", "float16"] = "float32"  # "float16": half the scales' bytes
    smooth: bool = True
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    weight_exponent: WeightExponent = "both"
    refine_iters: int = 0
    gptq: bool = False
    input_groups: tuple[tuple[str, ...], ...] | None = None
    search_rows: int = 1024
    svd: Literal["auto", "exact", "randomized"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("alphas", "input_groups"):  # JSON/YAML give lists
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, name, value)
        super().__post_init__()
        self.spec()
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"SVDQuant.alphas={self.alphas!r} must be a non-empty tuple of values in [0, 1]")
        for name in ("refine_iters", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"SVDQuant.{name}={getattr(self, name)} must be >= 0")
        if self.search_rows <= 0:
            raise ValueError(f"SVDQuant.search_rows={self.search_rows} must be positive")
        seen: set[str] = set()
        for group in self.input_groups or ():
            if len(group) < 2 or len(set(group)) != len(group):
                raise ValueError(f"SVDQuant.input_groups: {group!r} must name at least two distinct layers")
            if seen & set(group):
                raise ValueError(f"SVDQuant.input_groups: {sorted(seen & set(group))} appear in two groups")
            seen |= set(group)

    def spec(self, input_group: str | None = None) -> QuantSpec:
        a_group_size = self.a_group_size
        if a_group_size == "auto":
            a_group_size = 64 if self.a_bits is not None and self.a_format == "int" else None
        return self.quant_spec(input_group=input_group, a_group_size=a_group_size)


# ---- the algorithm for one input group --------------------------------------------------------------


def low_rank_branch(weight: torch.Tensor, rank: int, method: str = "auto", seed: int = 0, *,
                    gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (in, r), up (r, out)) with down @ up ≈ weightᵀ: the best rank-r approximation, √Σ on both sides.

    "exact" takes the top r eigenvectors of the smaller Gram matrix (wᵀw or wwᵀ) in float64: the same
    factors as an SVD (to float32 precision: float64 more than makes up for squaring the condition number)
    at a fraction of its cost, and `gram` (float64 wᵀw, (in, in)) lets a search over rescaled copies of one
    weight reuse it. "randomized" is a seeded range finder (r + 16 columns, 4 power iterations, QR between
    them): for the top r singular directions of a weight with a decaying spectrum it matches the exact
    factors to float precision at a fraction of the cost; "auto" uses it when the smaller side exceeds 512.
    """
    w = weight.float()
    if _exact(w.shape, rank, method):
        return _top_eigenvectors_branch(w, rank, gram)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(w @ torch.randn(w.shape[1], rank + 16, generator=gen).to(w.device)).Q  # (out, k)
    for _ in range(4):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    ub, sigma, vh = torch.linalg.svd(q.T @ w, full_matrices=False)  # (k, k), (k,), (k, in)
    u = q @ ub
    root = sigma[:rank].sqrt()
    return vh[:rank].T * root, (u[:, :rank] * root).T


def _exact(shape: Sequence[int], rank: int, method: str) -> bool:
    """Whether `low_rank_branch` computes the exact factors for a weight of this shape."""
    return method == "exact" or (method == "auto" and min(shape) <= 512) or rank + 16 >= min(shape)


def _top_eigenvectors_branch(w: torch.Tensor, rank: int, gram: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact branch from the eigenvectors of wᵀw (tall or square w) or wwᵀ (wide w), in float64."""
    w64 = w.double()
    tall = w.shape[0] >= w.shape[1]
    if gram is None:
        gram = w64.T @ w64 if tall else w64 @ w64.T
    elif not tall:
        raise ValueError("low_rank_branch: gram= is wᵀw, for a weight with at least as many rows as columns")
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    top = vectors[:, -rank:].flip(1) if rank else vectors[:, :0]  # (side, r): singular vectors of that side
    root = eigenvalues[-rank:].flip(0).clamp_min(0).sqrt().sqrt() if rank else eigenvalues[:0]  # √σ
    inverse = torch.where(root > 0, 1 / root, torch.zeros_like(root))  # a zero direction contributes nothing
    if tall:  # top = V_r: down = V√Σ, up = (U√Σ)ᵀ = (W V / √Σ)ᵀ
        return (top * root).float(), ((w64 @ top) * inverse).T.float()
    return ((w64.T @ top) * inverse).float(), (top * root).T.float()  # top = U_r


@dataclass
class GroupResult:
    """What one group's calibration chose: s, the branch, each layer's residual codes, and the errors."""

    smooth: torch.Tensor | None  # (in,)
    down: torch.Tensor | None  # (in, r)
    ups: list[torch.Tensor | None]  # per layer (r, out_i)
    codes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # per layer (codes, scales, zeros)
    info: dict[str, Any]


@torch.no_grad()
def svdquant_group(weights: Sequence[torch.Tensor], x: torch.Tensor, act_absmax: torch.Tensor, recipe: SVDQuant,
                   seed: int = 0, workers: int = 1) -> GroupResult:
    """SVDQuant for layers reading one input: weights [(out_i, in)], calibration rows x (rows, in), the
    per-channel absmax of everything the input held. Runs on the weights' device; on the CPU every op runs on
    one thread (small linear algebra) and the grid points are spread over `workers` threads
    (`ditq.threads.map_tasks`: the same result for any count)."""
    with torch_threads(1) if weights[0].device.type == "cpu" else nullcontext():
        return _calibrate_group(weights, x, act_absmax, recipe, seed, workers)


def _calibrate_group(weights: Sequence[torch.Tensor], x: torch.Tensor, act_absmax: torch.Tensor, recipe: SVDQuant,
                     seed: int, workers: int) -> GroupResult:
    """`svdquant_group`'s work, on the threads it chose."""
    device = weights[0].device
    w = torch.cat([wi.float() for wi in weights])  # (out, in)
    splits = [wi.shape[0] for wi in weights]
    spec = recipe.spec()
    x = x.to(device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x.shape[0], generator=gen)[: recipe.search_rows].sort().values.to(device)
    xs = x[pick]  # (n, in) rows scored in the search
    err_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reuse = recipe.rank and w.shape[0] >= w.shape[1] and _exact(w.shape, recipe.rank, recipe.svd)
    gram = w.double().T @ w.double() if reuse else None  # WᵀW, rescaled per grid point

    def residual_codes(r: torch.Tensor) -> torch.Tensor:  # RTN Q(R), dequantized
        scale = spec.store_scale(compute_qparams(r, spec.w_bits, spec.group_size, True)[0])
        return dequantize(quantize(r, scale, None, spec.w_bits, True), scale, None, spec.group_size)

    def branch(m: torch.Tensor, m_gram: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return low_rank_branch(m, recipe.rank, recipe.svd, seed, gram=m_gram) if recipe.rank else (None, None)

    def output_error(s: torch.Tensor | None, r: torch.Tensor, rq: torch.Tensor) -> float:
        """‖Q(h)Q(R)ᵀ + hL − XWᵀ‖² = ‖(Q(h) − h)Q(R)ᵀ + h(Q(R) − R)ᵀ‖²: small terms, computed directly."""
        h = xs if s is None else xs / s
        dh = (quantize_activations(h, spec) - h).to(err_dtype)
        h = h.to(err_dtype)
        total = 0.0
        for rq_i, r_i in zip(rq.split(splits), r.split(splits), strict=True):  # per layer: bounded memory
            e = dh @ rq_i.to(err_dtype).T + h @ (rq_i - r_i).to(err_dtype).T  # (n, out_i)
            total += float(e.float().square().sum())
        return total / (xs.shape[0] * w.shape[0])

    def score(candidate: tuple[float, float, torch.Tensor | None]) -> dict[str, Any]:
        alpha, beta, s = candidate
        ws = w if s is None else w * s  # Ŵ = W·diag(s)
        s64 = None if s is None else s.double()
        down, up = branch(ws, gram if gram is None or s64 is None else s64[:, None] * gram * s64)  # ŴᵀŴ
        r = ws if down is None else ws - (down @ up).T
        return {"alpha": alpha, "beta": beta, "s": s, "ws": ws, "down": down, "up": up, "r": r,
                "error": output_error(s, r, residual_codes(r))}

    w_absmax = w.abs().amax(dim=0)
    if recipe.smooth:
        candidates = smooth_candidates(act_absmax.to(device), w_absmax, recipe.alphas, recipe.weight_exponent)
    else:
        candidates = [(0.0, 0.0, None)]
    best: dict[str, Any] | None = None
    for scored in map_tasks(score, candidates, workers if device.type == "cpu" else 1):
        if best is None or scored["error"] < best["error"]:  # ties: the earlier grid point, as in grid order
            best = scored
    info = {"alpha": best["alpha"], "beta": best["beta"], "error_search": best["error"], "refine_rounds": 0}
    s, ws, down, up, r = best["s"], best["ws"], best["down"], best["up"], best["r"]
    for k in range(recipe.refine_iters if recipe.rank else 0):  # L ← SVD_r(Ŵ − Q(Ŵ − L)), early stopped
        new_down, new_up = branch(ws - residual_codes(r), None)
        new_r = ws - (new_down @ new_up).T
        err = output_error(s, new_r, residual_codes(new_r))
        if err >= best["error"]:
            break
        down, up, r, best["error"] = new_down, new_up, new_r, err
        info["refine_rounds"] = k + 1
    info["error"] = best["error"]
    codes = []
    h_all = x if s is None else x / s
    h_gptq = hessian(h_all) if recipe.gptq else None
    member_spec = QuantSpec(w_bits=spec.w_bits, group_size=spec.group_size)
    for r_i in r.split(splits):
        if recipe.gptq:
            codes.append(gptq(r_i, h_gptq, member_spec))
        else:
            scale = spec.store_scale(compute_qparams(r_i, spec.w_bits, spec.group_size, True)[0])
            codes.append((quantize(r_i, scale, None, spec.w_bits, True), scale, None))
    ups = [None] * len(weights) if up is None else list(up.split(splits, dim=1))
    return GroupResult(smooth=s, down=down, ups=ups, codes=codes, info=info)


# ---- the method: plan the groups, run them one by one, resumably --------------------------------------


def check_svdquant_plan(model: nn.Module, targets: dict[str, SVDQuant]) -> None:
    """SVDQuant's refusals that no calibration data changes: declared input groups that differ between layers,
    name a layer the recipe does not quantize, or join layers of different widths or recipes."""
    declared = {r.input_groups for r in targets.values()}
    if len(declared) > 1:
        raise ValueError("SVDQuant.input_groups must not differ between layers (overrides)")
    for group in next(iter(declared)) or ():
        missing = [n for n in group if n not in targets]
        if missing:
            raise ValueError(f"SVDQuant.input_groups {group!r}: {missing} are not Linears this recipe quantizes")
        _check_group_members(model, group, targets)


def _check_group_members(model: nn.Module, group: tuple[str, ...], targets: dict[str, SVDQuant]) -> None:
    lead = group[0]
    for name in group[1:]:
        if model.get_submodule(name).in_features != model.get_submodule(lead).in_features:
            raise ValueError(f"input group {group!r}: {name!r} and {lead!r} have different in_features; "
                             "layers of a group read one input")
        if _shared_fields(targets[name]) != _shared_fields(targets[lead]):
            raise ValueError(f"input group {group!r}: {name!r} and {lead!r} have different recipes (overrides); "
                             "a group shares its quantizers, smoothing and low-rank branch")


@register_method(SVDQuant, check_plan=check_svdquant_plan)
def quantize_svdquant(model: nn.Module, targets: dict[str, SVDQuant], calib: CalibData | None) -> dict[str, nn.Module]:
    return svdquant_modules(model, targets, calib)[0]


def svdquant_modules(
    model: nn.Module,
    targets: dict[str, SVDQuant],
    calib: CalibData | None,
    *,
    device: str | torch.device | None = None,
    state_dir: str | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, QuantLinear], dict[str, dict[str, Any]]]:
    """({name: QuantLinear}, {name: what the search chose}) for every target, one input group at a time.

    `device`: where each group is computed (default: its weights' device); results go back beside the
    weights. `state_dir`: save each finished group there and reuse the saved ones (resume). On the CPU a
    group's grid points are spread over `torch.get_num_threads()` workers of one thread each (`ditq.threads`).
    """
    units = plan_units(model, targets, calib)
    state = None if state_dir is None else LayerwiseState(state_dir)
    built: dict[str, QuantLinear] = {}
    report: dict[str, dict[str, Any]] = {}
    workers = torch.get_num_threads()  # the grid points of a group share the cores, one thread each
    bar = tqdm(total=len(targets), desc="SVDQuant", unit="layer", leave=False,
               disable={True: False, False: True, None: None}[progress])
    for gid, names in units:
        recipe = targets[names[0]]
        bar.set_postfix_str(names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}", refresh=False)
        linears = [model.get_submodule(n) for n in names]
        home = linears[0].weight.device
        work = torch.device(device) if device is not None else home
        x = torch.cat([calib.inputs[n] for n in names])  # members' samples of one input distribution
        absmax = torch.stack([calib.absmax[n] for n in names]).amax(0)
        specs = [recipe.spec(gid) for _ in names]
        saved = fingerprint = None
        if state is not None:
            tensors_in = {f"{n}.{k}": t for n, lin in zip(names, linears, strict=True) for k, t in lin.state_dict().items()}
            settings = {k: v for k, v in recipe.to_dict().items() if k not in ("skip", "overrides")}  # what it uses
            fingerprint = unit_fingerprint("svdquant", settings, names, {**tensors_in, "x": x, "absmax": absmax})
            saved = state.done(names[0], fingerprint)
        if saved is not None:
            tensors, info = saved
            modules = [_load_module(lin, spec, n, tensors) for n, lin, spec in zip(names, linears, specs, strict=True)]
        else:
            seed = int(layer_generator(recipe.seed, names[0]).initial_seed() % 2**31)
            with naming_layer(", ".join(names)):
                result = svdquant_group([lin.weight.detach().to(work) for lin in linears], x, absmax.to(work),
                                        recipe, seed, workers=workers)
            modules = [_build_module(lin, spec, result, i) for i, (lin, spec) in enumerate(zip(linears, specs, strict=True))]
            modules = [m.to(home) for m in modules]
            info = result.info
            if state is not None:
                state.save(names[0], fingerprint,
                           {f"{n}.{k}": t for n, m in zip(names, modules, strict=True) for k, t in m.state_dict().items()}, info)
        for n, m in zip(names, modules, strict=True):
            built[n] = m
            report[n] = {**info, "group": gid}
        bar.update(len(names))
    bar.close()
    return built, report


def svdquant_quantize(
    model: nn.Module,
    recipe: SVDQuant,
    calib: CalibData,
    *,
    device: str | torch.device | None = None,
    state_dir: str | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """`ditq.quantize(model, recipe, calib)` with SVDQuant's own options (compute device, resumable state
    directory); quantizes `model` in place once every module is built. Returns what each layer's search chose."""
    if not isinstance(recipe, SVDQuant):
        raise TypeError(f"svdquant_quantize takes an SVDQuant recipe, got {type(recipe).__name__}")
    built, report = svdquant_modules(model, check_plan(model, recipe), calib, device=device,
                                     state_dir=state_dir, progress=progress)
    install(model, built)
    model.ditq_recipe = recipe.to_dict()
    return report


def _build_module(linear: nn.Linear, spec: QuantSpec, result: GroupResult, i: int) -> QuantLinear:
    """Layer i of the group as a QuantLinear: its residual codes, the shared s and down-projection, its up slice."""
    module = _empty_like(linear, spec)
    with torch.no_grad():
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        for name, value in (("smooth", result.smooth), ("lowrank_down", result.down), ("lowrank_up", result.ups[i])):
            if value is not None:
                getattr(module, name).copy_(value)
    codes, scales, zeros = result.codes[i]
    module.set_codes(codes.to(module.qweight.device), scales.to(module.scales.device), zeros)
    return module


def _empty_like(linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
    dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
    return QuantLinear(linear.in_features, linear.out_features, spec, bias=linear.bias is not None,
                       device=linear.weight.device, dtype=dtype)


def _load_module(linear: nn.Linear, spec: QuantSpec, name: str, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    module = _empty_like(linear, spec)
    prefix = f"{name}."
    module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return module


def plan_units(model: nn.Module, targets: dict[str, SVDQuant], calib: CalibData | None
               ) -> list[tuple[str | None, tuple[str, ...]]]:
    """[(group id or None, layer names)] in module order, after every check the plan's (`ditq.api.check_plan`)
    leaves to the weights and calibration data (so nothing slow runs first)."""
    if calib is None:
        raise ValueError("SVDQuant needs calibration data (calib=ditq.calibrate(model, ...)): its smoothing "
                         "and error search read each layer's inputs")
    for name in targets:
        linear = model.get_submodule(name)
        if not bool(torch.isfinite(linear.weight).all()):
            raise ValueError(f"{name}: weight holds NaN or infinite values")
        calib.require(name, rows=True)
    declared = next(iter(targets.values())).input_groups
    if declared is None:
        adapter = adapter_for(model)
        groups = [] if adapter.name == "generic" else adapter.input_groups(model)
        groups = [tuple(n for n in g if n in targets) for g in groups]
        groups = [g for g in groups if len(g) > 1]
    else:
        groups = list(declared)
    for group in groups:
        _check_shared_input(model, group, targets, calib)
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    grouped = {n for g in groups for n in g}
    units: list[tuple[str | None, tuple[str, ...]]] = [(None, (n,)) for n in targets if n not in grouped]
    units += [(f"svdquant{i}", tuple(sorted(g, key=order.get))) for i, g in enumerate(groups)]
    return sorted(units, key=lambda u: order[u[1][0]])


def _check_shared_input(model: nn.Module, group: tuple[str, ...], targets: dict[str, SVDQuant],
                        calib: CalibData) -> None:
    _check_group_members(model, group, targets)
    lead = group[0]
    for name in group[1:]:
        same = torch.equal(calib.absmax[name], calib.absmax[lead]) and torch.equal(
            calib.step_absmax.get(name, calib.absmax[name]), calib.step_absmax.get(lead, calib.absmax[lead]))
        if not same:
            raise ValueError(f"input group {group!r}: {name!r} and {lead!r} do not read the same input (their "
                             "calibration inputs differ); a group may only hold layers fed by one tensor")


def _shared_fields(recipe: SVDQuant) -> tuple:
    return tuple(getattr(recipe, f.name) for f in fields(recipe) if f.name not in ("skip", "overrides"))


# The paper's skips (embedders, final layer) with the adaLN modulation quantized, on any architecture.
register_preset("svdquant-w4a4", SVDQuant(quantize_modulation=True))
register_preset("svdquant-w4a8", SVDQuant(quantize_modulation=True, a_bits=8, a_format="fp8"))
