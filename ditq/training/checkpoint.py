"""Files a training run writes: the resumable training state and the shipped weights.

Both are single safetensors files (no pickle), written to a temp file in the same folder, fsynced
and renamed, so a crash mid-write leaves the previous file intact. Tensors go in the body; every
non-tensor (step, config, optimizer hyper-parameters, numpy/python RNG states) goes in one JSON
string in the safetensors metadata.

Training state (``checkpoints/last.safetensors``): tensors ``model/<name>``, ``ema/<name>``,
``optim/<param index>/<key>`` and ``rng/<rank>/{torch,cuda,noise}``; metadata key ``ditq_train``.
Weights (``ema.safetensors``): the plain state dict; metadata key ``ditq`` = {"format":
"ditq.weights", "arch", "config", "dtype", ...} so that ``ditq.models.build(arch, config)``
rebuilds the model they belong to.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ditq

TRAIN_STATE_KEY = "ditq_train"
TRAIN_STATE_VERSION = 1
WEIGHTS_KEY = "ditq"
WEIGHTS_FORMAT = "ditq.weights"
WEIGHTS_VERSION = 1
RNG_TENSORS = ("torch", "cuda", "noise")


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> Path:
    """Write a safetensors file so that `path` is always either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def _read(path: Path, key: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if key not in metadata:
        raise ValueError(f"{path} is not a ditq {what}: its safetensors metadata has no {key!r} entry")
    return load_file(str(path)), json.loads(metadata[key])


# --------------------------------------------------------------------------------------------
# Shipped weights
# --------------------------------------------------------------------------------------------


def save_weights(model: nn.Module, path: str | Path, /, **info: Any) -> Path:
    """Save `model`'s state dict with the header `ditq.models.build` needs (arch, config)."""
    state = model.state_dict()
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
    header = {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_VERSION,
        "ditq_version": ditq.__version__,
        "arch": model.arch,
        "config": model.config,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        **info,
    }
    return atomic_save(state, {WEIGHTS_KEY: json.dumps(header)}, path)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, header) of a file written by `save_weights`; rebuild with
    ``ditq.models.build(header["arch"], header["config"])`` and ``load_state_dict(state)``."""
    tensors, header = _read(Path(path), WEIGHTS_KEY, "weights file")
    if header.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} holds format {header.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    if header.get("format_version", 0) > WEIGHTS_VERSION:
        raise ValueError(
            f"{path} has weights format version {header['format_version']}; this ditq reads up to {WEIGHTS_VERSION}"
        )
    return tensors, header


def export_fp16(ema_path: str | Path, dst: str | Path) -> Path:
    """Write the fp16 copy of trained fp32 weights that we ship (half the bytes, same header).

    Training keeps fp32 because EMA updates of size (1 − decay)·Δ vanish below fp16 resolution;
    inference needs no such precision.
    """
    tensors, header = read_weights(ema_path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    header = {**header, "dtype": "float16", "exported_from": Path(ema_path).name}
    return atomic_save(half, {WEIGHTS_KEY: json.dumps(header)}, dst)


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
        "ditq_version": ditq.__version__,
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
