"""Capture the inputs of every Linear while the full-precision model samples (SPEC §2, calibration).

PTQ methods need to know what their layers see at *every* timestep, since DiT activations drift along the
trajectory. `calibrate` runs the model's own sampler and keeps, per Linear, the per-channel absolute maximum
over everything it saw, plus a seeded uniform sample of input rows drawn evenly from every step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ditq.atomic import atomic_path
from ditq.diffusion import sample_images

CALIB_FORMAT_VERSION = 1


@dataclass
class CalibData:
    """Per-Linear statistics: `absmax` (in_features,) and `inputs` (rows, in_features), both float32 on CPU."""

    absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    n_samples: int = 0
    steps: int = 0

    def require(self, name: str) -> None:
        if name not in self.absmax:
            raise KeyError(f"calibration data has no entry for module {name!r}; was it captured on this model?")

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic safetensors write, so a long calibration is never lost to a half-written file."""
        path = Path(path)
        tensors = {f"absmax/{k}": v.contiguous() for k, v in self.absmax.items()}
        tensors |= {f"inputs/{k}": v.contiguous() for k, v in self.inputs.items()}
        meta = {"ditq_calib": json.dumps({"version": CALIB_FORMAT_VERSION, "n_samples": self.n_samples,
                                          "steps": self.steps})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibData:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("ditq_calib")
            if meta is None:
                raise ValueError(f"{path}: not a ditq calibration file")
            info = json.loads(meta)
            if info.get("version", 0) > CALIB_FORMAT_VERSION:
                raise ValueError(f"{path}: calibration format v{info['version']} is newer than this ditq reads")
            data = cls(n_samples=info["n_samples"], steps=info["steps"])
            for key in f.keys():
                kind, name = key.split("/", 1)
                getattr(data, kind)[name] = f.get_tensor(key)
        return data


@torch.no_grad()
def calibrate(
    model: nn.Module,
    *,
    n_samples: int = 32,
    steps: int = 25,
    cfg_scale: float = 1.5,
    sampler: str = "ddim",
    rows_per_layer: int = 2048,
    seed: int = 0,
    progress: bool = False,
) -> CalibData:
    """Sample `n_samples` images (classes spread evenly) and record every Linear's inputs along the way."""
    if n_samples <= 0 or steps <= 0 or rows_per_layer <= 0:
        raise ValueError("n_samples, steps and rows_per_layer must be positive")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    data = CalibData(n_samples=n_samples, steps=steps)
    rows_per_call = -(-rows_per_layer // steps)
    generator = torch.Generator().manual_seed(seed)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            absmax = x.abs().amax(dim=0).cpu()
            data.absmax[name] = torch.maximum(data.absmax[name], absmax) if name in data.absmax else absmax
            pick = torch.randperm(x.shape[0], generator=generator)[:rows_per_call]
            chunks[name].append(x[pick.to(x.device)].cpu())

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        labels = torch.arange(n_samples) % model.num_classes
        sample_images(model, labels, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed,
                      progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    for name, parts in chunks.items():
        if parts:
            rows = torch.cat(parts)
            keep = torch.randperm(rows.shape[0], generator=generator)[:rows_per_layer]
            data.inputs[name] = rows[keep.sort().values]
    return data
