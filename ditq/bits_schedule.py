"""Per-timestep precision: one nested (MatQuant) model served at different widths at different sampling steps.

A schedule is a list of (from, bits) entries. `from` is a fraction of the way through sampling: step k of
n (k = 0 the noisiest) is served by the last entry whose `from` ≤ k / n, so the first entry starts at 0.
`bits` is one width for every nested layer, or a served-bits plan ({layer pattern: width}, the first
matching pattern winning, as `ditq.load(path, bits=...)` reads it) that covers every nested layer, so that
what a step serves depends on its entry alone. Between two model calls the model moves to the next entry
with `apply_served_bits`: slices of the same stored codes, nothing is quantized again. A layer prepared for
a kernel backend at one width runs the reference at the others (`set_served_bits` warns).

    ditq.sample(model, labels, bits_schedule=[(0, 2), (0.5, 4), (0.8, {"blocks.0.*": 8, "*": 4})])
    [[0, 2], [0.5, 4], [0.8, {"blocks.0.*": 8, "*": 4}]]       # the same as a JSON file (`read`)
    0:2,0.5:4,0.8:8                                             # widths only, as a flag (`parse`)

In JSON a string names a plan file (a searched `plan.json`), relative to the schedule's folder. A schedule
costs the step-weighted average of its entries' bits per weight (`average_bits`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ditq.diffusion.samplers import StepHook
from ditq.io import ServedBits, apply_served_bits, served_bits_plan
from ditq.quant.served import average_bits, exact_plan, served_widths

__all__ = ["BitsSchedule"]


@dataclass(frozen=True)
class BitsSchedule:
    """(from-step fraction, served-bits plan) entries, `from` strictly increasing from 0."""

    entries: tuple[tuple[float, dict[str, int]], ...]

    def __init__(self, entries: Sequence[tuple[float, ServedBits]]) -> None:
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence) or not entries:
            raise ValueError(f"a bits schedule is a non-empty list of (from, bits) pairs, got {entries!r}")
        checked = []
        for k, entry in enumerate(entries):
            where = f"bits schedule entry {k}"
            if isinstance(entry, (str, bytes, Mapping)) or not isinstance(entry, Sequence) or len(entry) != 2:
                raise ValueError(f"{where}: {entry!r} is not a (from, bits) pair")
            start, bits = entry
            if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < 1:
                raise ValueError(f"{where}: from={start!r} must be a fraction of the steps in [0, 1)")
            previous = checked[-1][0] if checked else None
            if (previous is None and start != 0) or (previous is not None and start <= previous):
                raise ValueError(f"{where}: from={start!r}; the first entry starts at 0 and each later one "
                                 "after the one before")  # fmt: skip
            try:
                checked.append((float(start), served_bits_plan(bits)))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        object.__setattr__(self, "entries", tuple(checked))

    @classmethod
    def read(cls, path: str | os.PathLike) -> BitsSchedule:
        """The schedule a JSON file holds: `[[from, bits or plan or plan file], ...]`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"bits schedule {path}: cannot be read as JSON ({err})") from None
        if not isinstance(data, list):
            raise ValueError(f"bits schedule {path}: must hold a list of [from, bits] pairs")
        here = path.parent
        entries = [[e[0], here / e[1]] if isinstance(e, list) and len(e) == 2 and isinstance(e[1], str) else e
                   for e in data]  # fmt: skip
        try:
            return cls(entries)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def parse(cls, text: str) -> BitsSchedule:
        """`"0:2,0.5:4,0.8:8"`: from-fraction:width pairs."""
        entries = []
        for part in text.split(","):
            start, sep, bits = part.partition(":")
            try:
                entries.append((float(start), int(bits)))
            except ValueError:
                raise ValueError(f"bits schedule {text!r}: {part!r} is not FROM:BITS (e.g. 0.5:4)") from None
            if not sep or not math.isfinite(entries[-1][0]):
                raise ValueError(f"bits schedule {text!r}: {part!r} is not FROM:BITS (e.g. 0.5:4)")
        return cls(entries)

    def entry_at(self, step: int, steps: int) -> int:
        """Index of the entry that serves `step` (0 the noisiest) of `steps`."""
        if not 0 <= step < steps:
            raise ValueError(f"step {step} is not one of 0..{steps - 1}")
        return max(k for k, (start, _) in enumerate(self.entries) if start <= step / steps)

    def steps_served(self, steps: int) -> list[int]:
        """How many of `steps` steps each entry serves (an entry may serve none at few steps)."""
        counts = [0] * len(self.entries)
        for step in range(steps):
            counts[self.entry_at(step, steps)] += 1
        return counts

    def widths(self, model: nn.Module) -> list[dict[str, int]]:
        """Each entry's width per nested layer of `model`; checks every entry against the model."""
        resolved = []
        for k, (_, plan) in enumerate(self.entries):
            try:
                resolved.append(served_widths(model, plan, complete=True))
            except ValueError as err:
                raise ValueError(f"bits schedule entry {k}: {err}") from None
        return resolved

    def average_bits(self, model: nn.Module, steps: int, cost: str = "nominal") -> float:
        """Bits per weight of `model`'s nested layers by `cost` (`ditq.quant.served.COSTS`), averaged over
        `steps` sampling steps."""
        per_entry = [average_bits(model, widths, cost) for widths in self.widths(model)]
        return sum(n * bits for n, bits in zip(self.steps_served(steps), per_entry, strict=True)) / steps

    @contextmanager
    def serving(self, model: nn.Module) -> Iterator[StepHook]:
        """A sampler's `before_step` hook that serves each step its entry; the model's widths come back after."""
        self.widths(model)  # every entry fits the model before the first step
        before = served_widths(model)
        current: list[int | None] = [None]

        def before_step(step: int, steps: int) -> None:
            k = self.entry_at(step, steps)
            if k != current[0]:
                apply_served_bits(model, self.entries[k][1])
                current[0] = k

        try:
            yield before_step
        finally:
            apply_served_bits(model, exact_plan(before))
