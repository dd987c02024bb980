"""`CalibData`: what every Linear saw during calibration, tagged by step, and its file form.

Per Linear (by module name):

| field         | dtype             | shape                | meaning                                              |
|---------------|-------------------|----------------------|------------------------------------------------------|
| `absmax`      | float32           | (in,)                | per-channel max |x| over everything seen              |
| `step_absmax` | float32           | (steps, in)          | the same per step (0 where the layer was not called)  |
| `inputs`      | the layer's input | (rows, in)           | a seeded uniform sample of input rows, arrival order |
| `input_steps` | int64             | (rows,)              | the step each kept row was seen at                   |

Layers that read one tensor and each kept every row they saw hold the same rows (a DiT's adaLN Linears all
read SiLU(c)); `share_identical_rows` keeps one copy for them, bit for bit the same data.

A step is one call of the model's own forward: one sampler step for zoo models (`timesteps[s]` is the
diffusion timestep the model saw at step s), one call of whatever the user's `run` does otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ditq.fileformat import CheckpointError, header_field, read_file, write_file

_KINDS = ("absmax", "step_absmax", "inputs", "input_steps")
_CHECKED_KINDS = ("absmax", "step_absmax", "inputs")  # the float data a NaN or infinity would poison


@dataclass
class CalibData:
    """Per-Linear statistics and sampled input rows; see the module docstring for the table."""

    absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    step_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    input_steps: dict[str, torch.Tensor] = field(default_factory=dict)
    timesteps: tuple[int, ...] = ()
    n_samples: int = 0
    steps: int = 0
    # name → the tensors found finite: a layer's data is scanned once, not on every `require` (a search
    # quantizes hundreds of candidates from one CalibData); a tensor put in their place is scanned again
    _finite: dict[str, tuple[torch.Tensor | None, ...]] = field(default_factory=dict, init=False, repr=False,
                                                                compare=False)

    def require(self, name: str, rows: bool = False) -> None:
        """Raise naming `name` if it has no statistics (or, with `rows`, no sampled input rows), or if any of
        its data is NaN or infinite: what every method checks before it uses a layer's data."""
        if name not in self.absmax:
            raise ValueError(
                f"calibration data has no entry for module {name!r}; was it captured on this model?"
            )
        if rows and name not in self.inputs:
            raise ValueError(f"calibration data keeps no input rows for module {name!r} (rows_per_layer=0?)")
        self._check_finite(name, "calibration data")

    def check_finite(self, where: str = "calibration data") -> None:
        """Raise naming the layer if any statistic or row is NaN or infinite (it would poison every scale)."""
        for name in dict.fromkeys([*self.absmax, *self.step_absmax, *self.inputs]):
            self._check_finite(name, where)

    def _check_finite(self, name: str, where: str) -> None:
        tensors = tuple(getattr(self, kind).get(name) for kind in _CHECKED_KINDS)
        checked = self._finite.get(name)
        if checked is not None and all(a is b for a, b in zip(checked, tensors, strict=True)):
            return
        for kind, tensor in zip(_CHECKED_KINDS, tensors, strict=True):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}: {kind} of layer {name!r} holds NaN or infinite values")
        self._finite[name] = tensors

    def share_identical_rows(self) -> None:
        """Make layers whose sampled rows and steps are bitwise equal hold one copy of them. Only layers with
        equal statistics are compared (a layer's rows are a sample of what its absmax saw)."""
        leads: dict[tuple, list[str]] = {}
        for name, rows in self.inputs.items():
            key = (rows.shape, rows.dtype, self.absmax[name].numpy().tobytes())
            candidates = leads.setdefault(key, [])
            lead = next((c for c in candidates if _same_bits(self.inputs[c], rows)
                         and _same_bits(self.input_steps[c], self.input_steps[name])), None)
            if lead is None:
                candidates.append(name)
            else:
                self.inputs[name], self.input_steps[name] = self.inputs[lead], self.input_steps[lead]

    def save(self, path: str | os.PathLike) -> Path:
        """Write through `ditq.fileformat` (atomic, verified, hashed), so a long calibration is never lost.
        The file holds each layer's own copy of shared rows; `load` shares them again."""
        tensors, written = {}, set()
        for kind in _KINDS:
            for name, tensor in getattr(self, kind).items():
                tensors[f"{kind}/{name}"] = tensor.clone() if id(tensor) in written else tensor
                written.add(id(tensor))
        info = {"n_samples": self.n_samples, "steps": self.steps, "timesteps": list(self.timesteps)}
        return write_file(path, tensors, kind="calibration", header={"calibration": info})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibData:
        """Read a file `save` wrote; refuses unreadable, inconsistent or non-finite data, naming the path."""
        tensors, header = read_file(path, kind="calibration")
        info = header_field(path, header, "calibration", dict)
        timesteps = header_field(path, info, "timesteps", list, "calibration")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps):
            raise CheckpointError(f"{path}: header field 'calibration.timesteps' must hold ints, got {timesteps!r}")
        data = cls(
            n_samples=header_field(path, info, "n_samples", int, "calibration"),
            steps=header_field(path, info, "steps", int, "calibration"),
            timesteps=tuple(timesteps),
        )
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in _KINDS:
                raise CheckpointError(f"{path}: unknown calibration tensor {key!r}")
            getattr(data, kind)[name] = tensor
        for name, rows in data.inputs.items():
            steps = data.input_steps.get(name)
            if steps is None or steps.shape != rows.shape[:1] or name not in data.absmax:
                raise CheckpointError(f"{path}: calibration entries of layer {name!r} are incomplete")
        data.share_identical_rows()
        data.check_finite(str(path))
        return data


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (`torch.equal` calls 0.0 and -0.0 equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))
