"""One checkpoint format for every method: a `.safetensors` file whose metadata carries a JSON header.

The header names the format version, the ditq version, the model (arch + config, so the skeleton can be
rebuilt), each quantized module's `QuantSpec`, the recipe, and a SHA-256 over all tensor bytes. The
format never depends on the file name. Files are written to a temporary file beside the target and
renamed, so a crash never leaves a partly written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ditq import __version__
from ditq.atomic import atomic_path
from ditq.models import build
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

FORMAT = "ditq"
FORMAT_VERSION = 1
HEADER_KEY = "ditq"


class CheckpointError(ValueError):
    """A checkpoint file that ditq cannot read: truncated, corrupted, foreign or from a newer format."""


def save(model: nn.Module, path: str | os.PathLike, *, info: dict[str, Any] | None = None) -> Path:
    """Write `model` (quantized or not) to `path` atomically; returns the path.

    `info` is free JSON-serialisable provenance (training step, config…) kept in the header.
    """
    path = Path(path)
    arch, config = getattr(model, "arch", None), getattr(model, "config", None)
    if arch is None or config is None:
        raise ValueError(
            f"{type(model).__name__} has no .arch/.config: only ditq zoo models can be saved "
            "(build them with ditq.models.create)"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    modules = {
        name: {"spec": m.spec.to_dict(), "bias": m.bias is not None}
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ditq_version": __version__,
        "model": {"arch": arch, "config": config},
        "modules": modules,
        "recipe": getattr(model, "ditq_recipe", None),
        "sha256": tensors_digest(tensors),
        "info": info or {},
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a ditq checkpoint, validated; raises `CheckpointError` naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or foreign?): {err}") from err
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without a ditq header (foreign checkpoint?)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the ditq header is not valid JSON: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the header does not describe a ditq checkpoint")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: the header has no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format v{version} by ditq {header.get('ditq_version')}; "
            f"this ditq {__version__} reads up to v{FORMAT_VERSION} — upgrade ditq"
        )
    for key in ("model", "modules", "sha256"):
        if key not in header:
            raise CheckpointError(f"{path}: the header lacks {key!r}")
    return header


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its tensors (bit-identical to the saved model).

    The skeleton is built on the meta device and the tensors are assigned, so nothing is allocated twice.
    """
    path = Path(path)
    header = read_header(path)
    with torch.device("meta"):
        model = build(header["model"]["arch"], header["model"]["config"])
        for name, entry in header["modules"].items():
            linear = _get_linear(model, name, path)
            spec = QuantSpec.from_dict(entry["spec"])
            model.set_submodule(
                name, QuantLinear(linear.in_features, linear.out_features, spec, bias=entry["bias"])
            )
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: tensor data is unreadable (truncated?): {err}") from err
    if tensors_digest(tensors) != header["sha256"]:
        raise CheckpointError(f"{path}: tensor bytes do not match the header's SHA-256 (corrupted file)")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    for key, ref in expected.items():
        if tuple(ref.shape) != tuple(tensors[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model expects {tuple(ref.shape)}"
            )
    model.load_state_dict(tensors, assign=True)
    _check_no_meta_buffers(model, path)
    if header.get("recipe") is not None:
        model.ditq_recipe = header["recipe"]
    return model.eval()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of all tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _get_linear(model: nn.Module, name: str, path: Path) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise CheckpointError(f"{path}: quantized module {name!r} does not exist in the model") from err
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"{path}: module {name!r} is a {type(module).__name__}, not a Linear")
    return module


def _check_no_meta_buffers(model: nn.Module, path: Path) -> None:
    """Non-persistent buffers are not in the file; zoo models must have none left on the meta device."""
    leftovers = [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:
        raise CheckpointError(f"{path}: buffers {leftovers} are not stored in the checkpoint")
