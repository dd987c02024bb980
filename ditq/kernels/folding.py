"""Folding SVDQuant's smoothing into the producer of a layer's input, so that no kernel divides by it at run time.

A smoothed layer computes Q(x/s)·Ŵᵀ + (x/s)·L1·L2 + b. Where x is made of a producer's rows (`FoldSite`, declared
by the architecture's adapter), dividing those rows by s once makes the producer emit x/s, and the layer reads it
as it comes (`QuantLinear.smoothing_folded`): the same outputs but for the roundings of the intermediates. The
FP8 backends fold (their pre-pass otherwise multiplies every input by 1/s; dividing by s took 1.3–2.9× an
unsmoothed launch's time on an H200, `ditq.kernels.fp8`). What a producer's rows become:
- Linear rows (a value projection, adaLN's shift): weight and bias rows / s; a quantized Linear's per-channel or
  per-group scales, bias and low-rank up-projection columns / s, exact on its codes;
- adaLN's scale rows, read as (1 + scale): weight rows / s and bias (b + 1)/s − 1, so 1 + scale' = (1 + scale)/s;
  only in a full-precision Linear with a bias (a quantized modulation keeps its smoothing at run time);
- a norm's affine weight and bias: / s.
A site folds only when every reader is a smoothed QuantLinear that runs the folding backend and all hold one
smoothing vector (an input group's), and every new value is finite. A fold is not undone: later backends honour
it, and `ditq.save` refuses a folded model, whose producers no longer hold the weights it was quantized from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ditq.adapters import FoldSite, Rows
from ditq.quant.qlinear import QuantLinear

__all__ = ["fold_smoothing", "folded_layers"]

logger = logging.getLogger("ditq.kernels")


@torch.no_grad()
def fold_smoothing(model: nn.Module, sites: list[FoldSite], runs_backend: Callable[[QuantLinear], bool]) -> int:
    """Fold each site whose readers all run the backend (`runs_backend`) and share one smoothing vector into its
    producers; returns how many layers stopped smoothing. Sites already folded, or whose readers do not smooth,
    are passed over; any other that cannot fold is logged with why (one line per reason)."""
    folded = 0
    refused: dict[str, list[str]] = {}
    for site in sites:
        readers = [model.get_submodule(name) for name in site.readers]
        smoothed = [r for r in readers if isinstance(r, QuantLinear) and r.smooth is not None]
        if not smoothed or any(r.smoothing_folded or not runs_backend(r) for r in smoothed):
            continue  # nothing to fold, folded before, or left on the reference (`prepare_for_inference` says why)
        reason = "a layer reading the same tensor does not smooth" if len(smoothed) < len(readers) else _refusal(readers)
        divided = None if reason else _divided_rows(model, site.producers, readers[0].smooth)
        if isinstance(divided, str) or reason:
            refused.setdefault(reason or divided, []).append(site.readers[0])
            continue
        for target, value in divided:
            target.copy_(value)
        for reader in readers:
            reader.smoothing_folded = True
        folded += len(readers)
    for reason, names in refused.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        logger.info("the smoothing of %s stays at run time: %s", shown, reason)
    return folded


def folded_layers(model: nn.Module) -> list[str]:
    """The names of `model`'s layers whose smoothing was folded into their inputs' producers."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.smoothing_folded]


def _refusal(readers: list[QuantLinear]) -> str | None:
    """Why readers of one tensor cannot all take it divided by one smoothing vector, or None."""
    if any(not torch.equal(r.smooth, readers[0].smooth) for r in readers[1:]):
        return "the layers reading one tensor hold different smoothing vectors"
    return None


def _divided_rows(model: nn.Module, producers: tuple[Rows, ...], smooth: torch.Tensor
                  ) -> list[tuple[torch.Tensor, torch.Tensor]] | str:
    """(view of a producer tensor, its new value) for every tensor the producers' rows hold, each computed in
    float64 and rounded once to the tensor's dtype; or why the rows cannot be divided."""
    s = smooth.detach().double()
    out = []
    for rows in producers:
        module = model.get_submodule(rows.module)
        if rows.stop - rows.start != s.numel():  # the adapter's table is wrong
            raise ValueError(f"fold site: {rows.module} rows [{rows.start}, {rows.stop}) do not match the "
                             f"{s.numel()} channels of the smoothing")
        span = slice(rows.start, rows.stop)
        if isinstance(module, QuantLinear):
            if rows.gain:
                return "its modulation Linear is quantized"
            views = [(module.scales[span], s[:, None], True)]  # (rows, n_groups): exact on the codes, kept > 0
            views += [] if module.bias is None else [(module.bias[span], s, False)]
            views += [] if module.lowrank_up is None else [(module.lowrank_up[:, span], s[None, :], False)]
        elif isinstance(getattr(module, "weight", None), torch.Tensor):  # nn.Linear (out, in) or a norm's (D,)
            bias = getattr(module, "bias", None)
            if rows.gain and bias is None:
                return "its modulation Linear has no bias to take 1/s − 1"
            weight = module.weight[span]
            views = [(weight, s.reshape(-1, *([1] * (weight.ndim - 1))), False)]
            views += [] if bias is None else [(bias[span], s, False)]
        else:
            return f"{rows.module} is a {type(module).__name__}, not a Linear or an affine norm"
        for view, factor, positive in views:
            gain_bias = rows.gain and view.ndim == 1  # the bias of 1 + scale: (b + 1)/s − 1
            value = ((view.double() + 1) / factor - 1 if gain_bias else view.double() / factor).to(view.dtype)
            if not bool(torch.isfinite(value).all()) or (positive and not bool((value > 0).all())):
                return "a divided row leaves the range of its dtype"
            out.append((view, value))
    return out
