"""A bounded, seeded sample of the rows one Linear sees during calibration, each tagged with its step.

Reservoir sampling with random keys: every row that streams past gets a key drawn from the layer's own
seeded generator, and the reservoir keeps the `capacity` rows with the largest keys. That is a uniform
sample without replacement of everything seen, whatever the number of calls, batches or steps, in memory
that never exceeds `capacity` rows. Kept rows are written into the slots of evicted ones, so adding a
batch copies only the rows that enter.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def layer_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator for layer `name` of run `seed`: each layer's sample does not depend on the others."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class RowReservoir:
    """At most `capacity` rows (in the dtype the layer saw), their step tags and their arrival order."""

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.generator = generator
        self.count = 0  # rows held
        self.seen = 0  # rows offered so far
        self.rows: torch.Tensor | None = None  # (allocated, in), CPU
        self.keys = torch.empty(0)
        self.steps = torch.empty(0, dtype=torch.int64)
        self.order = torch.empty(0, dtype=torch.int64)

    def add(self, x: torch.Tensor, step: int) -> None:
        """Offer the rows of `x` (n, in), seen at `step`; only the rows that enter leave x's device."""
        n = x.shape[0]
        if self.capacity == 0 or n == 0:
            return
        new_keys = torch.rand(n, generator=self.generator)
        held = self.count
        if held + n <= self.capacity:
            enter = torch.arange(n)
            slots = torch.arange(held, held + n)
        else:
            top = torch.cat([self.keys[:held], new_keys]).topk(self.capacity).indices
            enter = top[top >= held] - held
            kept = torch.zeros(held, dtype=torch.bool)
            kept[top[top < held]] = True
            free = torch.arange(held, self.capacity)
            slots = torch.cat([(~kept).nonzero().flatten(), free])[: enter.numel()]
        self._grow(int(slots.max()) + 1 if slots.numel() else 0, x)
        self.rows[slots] = x[enter.to(x.device)].detach().to("cpu", self.rows.dtype)
        self.keys[slots] = new_keys[enter]
        self.steps[slots] = step
        self.order[slots] = self.seen + enter
        self.count = max(held, int(slots.max()) + 1) if slots.numel() else held
        self.seen += n

    def _grow(self, needed: int, x: torch.Tensor) -> None:
        """Make room for `needed` rows, doubling up to `capacity` (a layer that sees few rows holds few)."""
        allocated = 0 if self.rows is None else self.rows.shape[0]
        if needed <= allocated:
            return
        size = min(self.capacity, max(needed, 2 * allocated))
        rows = torch.empty(size, x.shape[-1], dtype=x.dtype)
        keys, steps, order = torch.empty(size), torch.empty(size, dtype=torch.int64), torch.empty(size, dtype=torch.int64)
        if self.rows is not None:
            rows[:allocated], keys[:allocated] = self.rows, self.keys
            steps[:allocated], order[:allocated] = self.steps, self.order
        self.rows, self.keys, self.steps, self.order = rows, keys, steps, order

    def sample(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows (m, in), steps (m,)) in arrival order, or None if nothing was kept."""
        if self.count == 0:
            return None
        arrival = self.order[: self.count].argsort()
        return self.rows[arrival], self.steps[arrival]
