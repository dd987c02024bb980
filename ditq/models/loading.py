"""Load full-precision weights into a zoo model: official DiT ``.pt`` files or ``.safetensors``.

Loading is strict and checked before anything is copied, so a wrong file fails with one message
that lists every missing, unexpected and mis-shaped tensor. A model built on the meta device gets
the file's tensors assigned (no second copy in memory, the file's dtype); a materialised model
keeps its own device and dtype and has the values copied in.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIXES = (".safetensors",)
_MAX_LISTED = 20  # keys listed per category in an error message


def _read_torch(path: Path) -> Mapping[str, torch.Tensor]:
    """A weights-only torch file: a state dict, or a training checkpoint holding one under
    ``"ema"`` (preferred: the official weights are the EMA ones) or ``"model"``."""
    try:
        # DiT's train.py stores its argparse.Namespace beside the weights; allow that one class.
        # mmap needs the zip format (torch.save's default since 1.6); older files load normally.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({err})") from err
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of a weights file on the CPU, chosen by suffix (.pt/.pth or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    elif suffix in SAFETENSORS_SUFFIXES:
        state = _read_safetensors(path)
    else:
        raise ValueError(
            f"{path}: unsupported weights file suffix {suffix!r}; "
            f"expected one of {list(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)}"
        )
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError naming ``source`` if ``state`` does not fit ``model`` exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{source}: weights do not match {type(model).__name__}"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                parts.append(_listing(title, items))
        raise ValueError("\n".join(parts))


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load ``path`` into ``model`` strictly and return it.

    On a meta-device model (``with torch.device("meta"): create(...)``) the file's CPU tensors are
    assigned in place of the placeholders; otherwise values are copied into the existing tensors.
    """
    state = read_state_dict(path)
    check_state_dict(model, state, str(path))
    on_meta = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model
