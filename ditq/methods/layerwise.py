"""Resumable layer-by-layer work: one verified file per finished unit (a layer or an input group).

A long calibration (SVDQuant, GPTQ) quantizes one unit at a time from that unit's own inputs. After each
unit its result is written atomically through `ditq.fileformat` into a state directory; a run that was
killed and started again loads every finished unit instead of recomputing it, and, since each unit
depends only on its own inputs, ends with exactly the modules an uninterrupted run builds.

Each file records a fingerprint of what produced it (method, recipe, unit names, a digest of the unit's
weights and calibration tensors). A file whose fingerprint differs from the current run is refused with
the path and the reason, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditq.fileformat import CheckpointError, header_field, read_file, tensors_digest, write_file

__all__ = ["LayerwiseState", "unit_fingerprint"]

_KIND = "method_state"
_KEY = "layerwise"


def unit_fingerprint(method: str, recipe: Mapping[str, Any], names: tuple[str, ...],
                     tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the method, its recipe (JSON), the unit's module names and the bytes of its inputs."""
    text = json.dumps({"method": method, "recipe": recipe, "names": list(names)}, sort_keys=True, default=str)
    return hashlib.sha256((text + tensors_digest(tensors)).encode()).hexdigest()


class LayerwiseState:
    """The state directory of one run: `done(key, fingerprint)` → saved tensors and info, `save(...)` after a unit."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"state directory {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.directory / f"unit-{digest}.safetensors"

    def done(self, key: str, fingerprint: str, device: str | torch.device = "cpu"
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, info) of a finished unit, or None if it has not been saved yet."""
        path = self.path(key)
        if not path.exists():
            return None
        tensors, header = read_file(path, kind=_KIND, device=device)
        entry = header_field(path, header, _KEY, dict)
        if header_field(path, entry, "unit", str, _KEY) != key:
            raise CheckpointError(f"{path}: holds unit {entry['unit']!r}, not {key!r}")
        if header_field(path, entry, "fingerprint", str, _KEY) != fingerprint:
            raise CheckpointError(
                f"{path}: was written for other inputs of unit {key!r} (the recipe, the weights or the "
                f"calibration data changed); delete {self.directory} or choose another state directory"
            )
        return tensors, header_field(path, entry, "info", dict, _KEY)

    def save(self, key: str, fingerprint: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
        """Write one unit's result atomically (the file is read back and verified before it appears)."""
        entry = {"unit": key, "fingerprint": fingerprint, "info": dict(info)}
        return write_file(self.path(key), tensors, kind=_KIND, header={_KEY: entry})
