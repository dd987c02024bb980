"""Starting a run from other weights (`TrainConfig.init_from`): strict, except for TerDiT's adaLN RMSNorm.

A full-precision DiT has no RMSNorm after its adaLN Linear; a model built with `adaln_norm=True` does.
Fine-tuning such a model from FP weights keeps every FP tensor and initialises each new RMSNorm gain to
the mean RMS of the FP modulation vector over timesteps and classes, so that the fine-tune starts close
to the FP network instead of at unit-RMS modulations (a scalar gain cannot follow the per-sample RMS, so
the start is close, not equal).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ADALN_GAIN_SUFFIX", "load_init_weights"]

ADALN_GAIN_SUFFIX = "adaLN_modulation.2.weight"  # the only tensors a model may have that its source lacks
_PROBES = 256  # (t, y) pairs the modulation RMS is averaged over


def load_init_weights(
    model: nn.Module, source: nn.Module, ref: str, what: str, num_timesteps: int = 1000
) -> list[str]:
    """Copy `source`'s tensors into `model`; returns the adaLN RMSNorm gains it initialised instead.

    Raises ValueError naming `ref`, the model (`what`) and the tensors when anything else is missing or
    shaped differently.
    """
    ours, theirs = model.state_dict(), source.state_dict()
    new_gains = sorted(k for k in ours.keys() - theirs.keys() if k.endswith(ADALN_GAIN_SUFFIX))
    misfit = sorted(
        k for k in ours.keys() | theirs.keys()
        if k not in new_gains and (k not in ours or k not in theirs or ours[k].shape != theirs[k].shape)
    )  # fmt: skip
    if misfit:
        raise ValueError(
            f"init_from={ref!r} does not fit {what}: tensors {misfit[:5]} are missing or shaped differently"
        )
    model.load_state_dict(theirs, strict=False)
    if new_gains:
        _init_gains(model, source, new_gains, num_timesteps)
    return new_gains


@torch.no_grad()
def _init_gains(model: nn.Module, source: nn.Module, gains: list[str], num_timesteps: int) -> None:
    device = next(source.parameters()).device
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0, num_timesteps - 1, _PROBES).round().long().to(device)
    y = torch.randint(0, source.num_classes, (_PROBES,), generator=gen).to(device)
    c = source.t_embedder(t) + source.y_embedder(y, False)  # (P, cond)
    for key in gains:
        name = key.removesuffix(".2.weight")
        modulation = source.get_submodule(name)[:2](c.to(next(source.get_submodule(name).parameters()).dtype))
        rms = float(modulation.float().square().mean(dim=1).sqrt().mean())  # mean per-sample RMS
        if rms > 1e-6:  # an FP source still at adaLN-Zero has nothing to match: keep gain 1 (0 would be dead)
            model.get_submodule(f"{name}.2").weight.fill_(rms)
