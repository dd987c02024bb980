"""Capture what every Linear sees while the full-precision model runs (SPEC §2, calibration).

PTQ methods need to know what their layers see at *every* timestep, since DiT activations drift along the
trajectory. `calibrate` drives the model (zoo models: their own sampler; any model: the caller's `run`)
and streams each Linear's inputs into per-step absolute maxima and a bounded, seeded reservoir of rows
tagged with their step, so memory depends on `rows_per_layer`, not on how long the model runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ditq.adapters import adapter_for
from ditq.calib.data import CalibData
from ditq.calib.reservoir import RowReservoir, layer_generator


@torch.no_grad()
def calibrate(
    model: nn.Module,
    *,
    n_samples: int | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    sampler: str | None = None,
    rows_per_layer: int = 2048,
    seed: int = 0,
    progress: bool = False,
    run: Callable[[nn.Module], Any] | None = None,
) -> CalibData:
    """Record every Linear's inputs while `run(model)` drives the model, or, for a zoo model without
    `run`, while it samples `n_samples` images (classes spread evenly; defaults 32 images, 25 steps,
    guidance 1.5, DDIM). The model runs in eval mode under no_grad; its training flag is restored.

    Raises ValueError naming the layer if any input is NaN or infinite. `rows_per_layer=0` keeps the
    statistics only.
    """
    sampling = {"n_samples": n_samples, "steps": steps, "cfg_scale": cfg_scale, "sampler": sampler}
    given = {key: value for key, value in sampling.items() if value is not None}
    if run is not None and given:
        raise ValueError(
            f"{sorted(given)} set how ditq samples a zoo model; with run= your callable drives the model"
        )
    if any(isinstance(v, int) and not isinstance(v, bool) and v <= 0 for v in (n_samples, steps)):
        raise ValueError(f"n_samples and steps must be positive, got n_samples={n_samples}, steps={steps}")
    if not isinstance(rows_per_layer, int) or rows_per_layer < 0:
        raise ValueError(f"rows_per_layer must be an int >= 0, got {rows_per_layer!r}")
    adapter = adapter_for(model)
    if run is None:
        def run(m: nn.Module) -> Any:
            return adapter.run(m, seed=seed, progress=progress, **given)

    recorder = _Recorder(model, rows_per_layer, seed, adapter.step_timestep)
    was_training = model.training
    model.eval()
    try:
        with recorder:
            run(model)
    finally:
        model.train(was_training)
    return recorder.result(n_samples=n_samples or 0)


class _Recorder:
    """Forward hooks on every Linear (and one on the model that counts steps), removed on exit."""

    def __init__(self, model: nn.Module, rows_per_layer: int, seed: int, step_timestep: Callable) -> None:
        self.model = model
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.reservoirs = {name: RowReservoir(rows_per_layer, layer_generator(seed, name)) for name in self.linears}
        self.step_absmax: dict[str, list[torch.Tensor]] = {name: [] for name in self.linears}
        self.step_timestep = step_timestep
        self.timesteps: list[int | None] = []
        self.handles: list[Any] = []

    @property
    def step(self) -> int:
        return max(len(self.timesteps) - 1, 0)

    def __enter__(self) -> _Recorder:
        def count_step(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.timesteps.append(self.step_timestep(args, kwargs))

        self.handles.append(self.model.register_forward_pre_hook(count_step, with_kwargs=True))
        self.handles += [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, m in self.linears.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str) -> Callable:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"calibration: layer {name!r} was called without an input tensor")
            x = x.detach()
            x = x.reshape(-1, x.shape[-1])  # (rows, in)
            absmax = x.abs().amax(dim=0).float().cpu() if x.shape[0] else torch.zeros(x.shape[-1])
            if not bool(torch.isfinite(absmax).all()):
                raise ValueError(
                    f"calibration: the input of layer {name!r} holds NaN or infinite values at step {self.step}"
                )
            per_step = self.step_absmax[name]
            while len(per_step) <= self.step:
                per_step.append(torch.zeros_like(absmax))
            torch.maximum(per_step[self.step], absmax, out=per_step[self.step])
            self.reservoirs[name].add(x, self.step)

        return record

    def result(self, n_samples: int) -> CalibData:
        steps = max(len(self.timesteps), 1)
        known = all(t is not None for t in self.timesteps)
        data = CalibData(n_samples=n_samples, steps=steps,
                         timesteps=tuple(self.timesteps) if known else ())  # fmt: skip
        for name in self.linears:
            per_step = self.step_absmax.pop(name)
            if not per_step:
                continue  # never called
            per_step += [torch.zeros_like(per_step[0])] * (steps - len(per_step))
            data.step_absmax[name] = torch.stack(per_step)  # (steps, in)
            data.absmax[name] = data.step_absmax[name].amax(dim=0)  # (in,)
            sample = self.reservoirs.pop(name).sample()
            if sample is not None:
                data.inputs[name], data.input_steps[name] = sample
        data.share_identical_rows()
        return data
