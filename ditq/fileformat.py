"""The one container for every file ditq writes: safetensors tensors plus one JSON header.

Checkpoints, calibration data and training state all go through `write_file` / `read_file`. The header
carries `format`, `kind`, one `format_version` for all kinds, the ditq version, a SHA-256 over every
tensor (names, dtypes, shapes, bytes) and, beside it, a SHA-256 of the header text itself, so neither a
flipped tensor byte nor an edited header field (`w_bits` 4 → 3) loads silently. Writes are atomic and
the temporary file is read back and verified before it replaces anything.

Version history: v1 (ditq 0.1) checkpoints had no `kind` and no header hash; they still load as
checkpoints. v2 (ditq 0.2) added both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ditq._version import __version__
from ditq.atomic import atomic_path

FORMAT = "ditq"
FORMAT_VERSION = 2
KINDS = ("checkpoint", "calibration", "train_state", "method_state")
HEADER_KEY = "ditq"
HEADER_HASH_KEY = "ditq_header_sha256"
STORABLE_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
})
_RESERVED = ("format", "kind", "format_version", "ditq_version", "sha256")

__all__ = ["FORMAT_VERSION", "KINDS", "CheckpointError", "check_device", "header_field", "read_file", "read_header", "write_file"]


class CheckpointError(ValueError):
    """A ditq file that cannot be read: truncated, corrupted, edited, foreign, of another kind or newer.

    The message starts with the file's path and names the field or tensor at fault.
    """


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, kind: str,
               header: Mapping[str, Any]) -> Path:
    """Write `tensors` and `header` to `path` atomically; the old file stays until the new one verifies."""
    path = Path(path)
    _check_kind(kind)
    clash = sorted(set(header) & set(_RESERVED))
    if clash:
        raise ValueError(f"header keys {clash} are reserved for the file format")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path")
    odd = sorted(f"{k} ({v.dtype})" for k, v in tensors.items() if v.dtype not in STORABLE_DTYPES)
    if odd:
        raise ValueError(f"{path}: tensors of a dtype the file format cannot store: {odd}")
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    full = {"format": FORMAT, "kind": kind, "format_version": FORMAT_VERSION, "ditq_version": __version__,
            "sha256": tensors_digest(cpu), **header}
    try:
        text = json.dumps(full, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the header is not plain JSON data: {err}") from err
    metadata = {HEADER_KEY: text, HEADER_HASH_KEY: _sha256_text(text)}
    _check_not_tied(path, cpu)
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
        _read(tmp, kind, shown=path, with_tensors=True)  # what readers will see, before it replaces anything
    return path


def _check_not_tied(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """safetensors stores each tensor's own bytes: tensors that share memory (tied weights) are refused."""
    owners: dict[int, str] = {}
    for key, t in sorted(tensors.items()):
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in owners:
            raise ValueError(f"{path}: tensors {owners[ptr]!r} and {key!r} share memory (tied weights); "
                             "untie them (e.g. clone one) before saving")
        owners[ptr] = key


def read_file(path: str | os.PathLike, *, kind: str, device: str | torch.device = "cpu"
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors on `device`, header) of a verified ditq file of `kind`."""
    device = check_device(device)
    path = Path(path)
    tensors, header = _read(path, kind, shown=path, with_tensors=True)
    return {k: v.to(device) for k, v in tensors.items()}, header


def read_header(path: str | os.PathLike, *, kind: str) -> dict[str, Any]:
    """The verified header of a ditq file of `kind` (tensors are not read)."""
    path = Path(path)
    return _read(path, kind, shown=path, with_tensors=False)[1]


def header_field(path: str | os.PathLike, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
                 where: str = "") -> Any:
    """`data[key]` checked to be of `kind`; otherwise `CheckpointError` naming the file and the field."""
    field = f"{where}.{key}" if where else key
    if not isinstance(data, Mapping) or key not in data:
        raise CheckpointError(f"{path}: the header lacks {field!r}")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise CheckpointError(f"{path}: header field {field!r} must be {names}, got {value!r}")
    return value


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of all tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- reading --------------------------------------------------------------------------------------


def _read(path: Path, kind: str, *, shown: Path, with_tensors: bool
          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    _check_kind(kind)
    if not path.exists():
        raise FileNotFoundError(f"{shown} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{shown} is a directory, not a ditq {kind} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            header = _parse_header(shown, metadata, kind)
            # own, aligned copies: safetensors may hand out views into the mapped file at unaligned offsets,
            # and CPU matmul kernels pick their code path by alignment (the last bit would differ)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{shown}: not a readable safetensors file (truncated or not safetensors): {err}"
                              ) from err
    if with_tensors and tensors_digest(tensors) != header["sha256"]:
        raise CheckpointError(f"{shown}: tensor bytes do not match the header's SHA-256 (corrupted file)")
    return tensors, header


def _parse_header(path: Path, metadata: Mapping[str, str], kind: str) -> dict[str, Any]:
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without a ditq header (not written by ditq?)")
    text = metadata[HEADER_KEY]
    try:
        header = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the ditq header is not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the header does not describe a ditq file (field 'format')")
    version = header_field(path, header, "format_version", int)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in ditq format v{version} by ditq {header.get('ditq_version')}; this ditq "
            f"{__version__} reads up to v{FORMAT_VERSION}: upgrade ditq"
        )
    if version >= 2:
        if metadata.get(HEADER_HASH_KEY) != _sha256_text(text):
            raise CheckpointError(f"{path}: the header was changed after it was written (its SHA-256 does not "
                                  "match); refusing an edited file")
        found = header_field(path, header, "kind", str)
    else:
        found = "checkpoint"  # v1 wrote checkpoints only under this key
    if found != kind:
        raise CheckpointError(f"{path}: a ditq {found} file, not a {kind} file (field 'kind')")
    header_field(path, header, "sha256", str)
    return header


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a ValueError that says what is wrong with it (never 'truncated?')."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
