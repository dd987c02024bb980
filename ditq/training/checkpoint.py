"""Files a training run writes: the resumable training state and the shipped weights.

Both go through `ditq.fileformat` (atomic, verified, hashed). Training state
(``checkpoints/last.safetensors``, kind "train_state"): tensors ``model/<name>``, ``ema/<name>``,
``optim/<param index>/<key>`` and ``rng/<rank>/{torch,cuda,noise}``; every non-tensor (step, config,
optimizer hyper-parameters, numpy/python RNG states) in the JSON header.
Weights (``ema.safetensors``): a ditq checkpoint (`ditq.save`), so ``ditq.load`` rebuilds the model, a
prepared QAT model included; the run's provenance (model name, step, training config) is in its ``info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ditq import io
from ditq.fileformat import CheckpointError, header_field, read_file, write_file

RNG_TENSORS = ("torch", "cuda", "noise")


# --------------------------------------------------------------------------------------------
# Shipped weights: ditq's one checkpoint format (`ditq.save`), with the run's provenance in `info`
# --------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: str | Path, /, **info: Any) -> Path:
    """Save `model` (full precision, or prepared for QAT) as a ditq checkpoint; `ditq.load(path)` rebuilds it."""
    return io.save(model, path, info=info)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, header) of a ditq checkpoint; the header flattens the run's `info` with the model's
    ``arch``, ``config`` and float ``dtype``."""
    header = io.read_header(path)
    tensors = load_file(str(path))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values() if v.is_floating_point()})
    flat = {**header.get("info", {}), **header["model"], "dtype": dtypes[0] if len(dtypes) == 1 else dtypes}
    return tensors, flat


def export_fp16(ema_path: str | Path, dst: str | Path) -> Path:
    """Write the fp16 copy of trained fp32 weights that we ship (half the bytes, same provenance).

    Training keeps fp32 because EMA updates of size (1 − decay)·Δ vanish below fp16 resolution;
    inference needs no such precision.
    """
    info = io.read_header(ema_path).get("info", {})
    model = io.load(ema_path).to(torch.float16)
    return io.save(model, dst, info={**info, "exported_from": Path(ema_path).name})


# --------------------------------------------------------------------------------------------
# Resumable training state
# --------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything needed to continue a run bit-exactly from after step `step`."""

    step: int
    epoch: int
    position: int  # batches of `epoch` already consumed
    elapsed_s: float
    world_size: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: list[dict[str, Any]]  # one per rank: see loop.capture_rng


def save_train_state(path: str | Path, state: TrainState) -> Path:
    """Flatten `state` into tensors + one JSON header and write it atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model/{k}": v for k, v in state.model.items()})
    tensors.update({f"ema/{k}": v for k, v in state.ema.items()})
    optim_scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state.optimizer["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                optim_scalars.setdefault(str(index), {})[key] = value
    rng_json = []
    for rank, rng in enumerate(state.rng):
        for key in RNG_TENSORS:
            if rng.get(key) is not None:
                tensors[f"rng/{rank}/{key}"] = rng[key]
        rng_json.append({k: v for k, v in rng.items() if k not in RNG_TENSORS})
    header = {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "elapsed_s": state.elapsed_s,
        "world_size": state.world_size,
        "config": state.config,
        "optim_param_groups": state.optimizer["param_groups"],
        "optim_scalars": optim_scalars,
        "rng": rng_json,
    }
    return write_file(path, tensors, kind="train_state", header=header)


def load_train_state(path: str | Path) -> TrainState:
    """Inverse of `save_train_state` (tensors on the CPU); `CheckpointError` names the file and field."""
    tensors, header = read_file(path, kind="train_state")
    field = {
        key: header_field(path, header, key, kind)
        for key, kind in (("step", int), ("epoch", int), ("position", int), ("elapsed_s", (int, float)),
                          ("world_size", int), ("config", dict), ("optim_param_groups", list),
                          ("optim_scalars", dict), ("rng", list))
    }  # fmt: skip
    model, ema, rng_tensors = {}, {}, {}
    optim_state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in field["optim_scalars"].items()}
    for name, value in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "model":
            model[rest] = value
        elif kind == "ema":
            ema[rest] = value
        elif kind == "optim":
            index, key = rest.split("/", 1)
            optim_state.setdefault(int(index), {})[key] = value
        elif kind == "rng":
            rank, key = rest.split("/", 1)
            rng_tensors[(int(rank), key)] = value
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in a training checkpoint")
    rng = [
        {**extra, **{key: rng_tensors.get((rank, key)) for key in RNG_TENSORS}}
        for rank, extra in enumerate(field["rng"])
    ]
    return TrainState(
        step=field["step"],
        epoch=field["epoch"],
        position=field["position"],
        elapsed_s=field["elapsed_s"],
        world_size=field["world_size"],
        config=field["config"],
        model=model,
        ema=ema,
        optimizer={"state": optim_state, "param_groups": field["optim_param_groups"]},
        rng=rng,
    )
