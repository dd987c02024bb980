"""Files a training run writes: the resumable training state and the shipped weights.

Both are single safetensors files (no pickle), written to a temp file in the same folder, fsynced
and renamed, so a crash mid-write leaves the previous file intact. Tensors go in the body; every
non-tensor (step, config, optimizer hyper-parameters, numpy/python RNG states) goes in one JSON
string in the safetensors metadata.

Training state (``checkpoints/last.safetensors``): tensors ``model/<name>``, ``ema/<name>``,
``optim/<param index>/<key>`` and ``rng/<rank>/{torch,cuda,noise}``; metadata key ``ditq_train``.
Weights (``ema.safetensors``): a full-precision ditq checkpoint (`ditq.save`), so ``ditq.load``
rebuilds the model; the run's provenance (model name, step, training config) is in its ``info``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditq import __version__, io
from ditq.atomic import atomic_path

TRAIN_STATE_KEY = "ditq_train"
TRAIN_STATE_VERSION = 1
RNG_TENSORS = ("torch", "cuda", "noise")


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> Path:
    """Write a safetensors file so that `path` is always either the old file or the complete new one."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
    return Path(path)


def _read(path: Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if key not in metadata:
        raise ValueError(f"{path} is not a ditq {what}: its safetensors metadata has no {key!r} entry")
    return load_file(str(path)), json.loads(metadata[key])


# --------------------------------------------------------------------------------------------
# Shipped weights: ditq's one checkpoint format (`ditq.save`), with the run's provenance in `info`
# --------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: str | Path, /, **info: Any) -> Path:
    """Save `model` as a full-precision ditq checkpoint; `ditq.load(path)` rebuilds it."""
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
    """Flatten `state` into tensors + one JSON metadata string and write it atomically."""
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
    meta = {
        "format_version": TRAIN_STATE_VERSION,
        "ditq_version": __version__,
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
    return atomic_save(tensors, {TRAIN_STATE_KEY: json.dumps(meta)}, path)


def load_train_state(path: str | Path) -> TrainState:
    """Inverse of `save_train_state` (tensors on the CPU)."""
    tensors, meta = _read(Path(path), TRAIN_STATE_KEY, "training checkpoint")
    if meta["format_version"] > TRAIN_STATE_VERSION:
        raise ValueError(
            f"{path} has training-state version {meta['format_version']}; this ditq reads up to {TRAIN_STATE_VERSION}"
        )
    model, ema, rng_tensors = {}, {}, {}
    optim_state: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in meta["optim_scalars"].items()}
    for name, value in tensors.items():
        kind, rest = name.split("/", 1)
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
            raise ValueError(f"{path}: unexpected tensor {name!r} in a training checkpoint")
    rng = [
        {**extra, **{key: rng_tensors.get((rank, key)) for key in RNG_TENSORS}}
        for rank, extra in enumerate(meta["rng"])
    ]
    return TrainState(
        step=meta["step"],
        epoch=meta["epoch"],
        position=meta["position"],
        elapsed_s=meta["elapsed_s"],
        world_size=meta["world_size"],
        config=meta["config"],
        model=model,
        ema=ema,
        optimizer={"state": optim_state, "param_groups": meta["optim_param_groups"]},
        rng=rng,
    )
