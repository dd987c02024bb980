"""MatQuant's Mix'n'Match, searched: one served bit-width per nested layer, under a budget in bits per weight.

The search takes one nested model (int8 codes, `spec.stored_bits` set, e.g. `ditq.load` of a MatQuant
checkpoint) and serves every genome from its stored codes with `set_served_bits`: no layer is quantized
again. A layer offers the widths asked for (by default the checkpoint recipe's `nested_bits`) up to its
stored bits. A width costs its slice as a layer of its own (`ditq.quant.served.COSTS`): "nominal" (the
default), its bits plus the scales; "stored", its packed slot plus the scales, as exported (5–7-bit codes
take a byte and 3-bit codes four bits, so a 6-bit slice costs as much as the 8-bit one). Of widths that
cost the same a layer offers only the widest, which serves more of the same stored bits for nothing.
The result is a served-bits plan, one entry per layer, that `ditq.load(path, bits="plan.json")` applies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ditq.io import apply_served_bits
from ditq.kernels import prepare_for_inference
from ditq.quant.served import COSTS, exact_plan, nested_layers, served_widths, slice_bits_per_weight
from ditq.search.space import Genome, SearchSpace, check_bits_budget


def checkpoint_widths(model: nn.Module) -> tuple[int, ...] | None:
    """The widths the nested model was trained to serve (its recipe's `nested_bits`), None if it names none."""
    recipe = getattr(model, "ditq_recipe", None)
    widths = recipe.get("nested_bits") if isinstance(recipe, dict) else None
    return tuple(widths) if widths else None


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """`widths` as distinct ints in 2..8, widest first."""
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or not 2 <= w <= 8 for w in widths):
        raise ValueError(f"widths {list(widths)!r} must be ints in 2..8")
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths {list(widths)!r} repeat a width")
    return tuple(sorted(widths, reverse=True))


class BitsSearch:
    """The served-width space of `model`'s nested layers, and how a genome is served from the stored codes."""

    output_file = "plan.json"

    def __init__(
        self,
        model: nn.Module,
        widths: Sequence[int] | None = None,
        budget: float = 4.0,
        *,
        cost: str = "nominal",
        backend: str = "dequantized",
    ) -> None:
        if cost not in COSTS:
            raise ValueError(f"cost={cost!r} is not one of {COSTS}")
        layers = nested_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no nested layer (spec.stored_bits set): the bit-width "
                             "search serves the slices of one MatQuant checkpoint")  # fmt: skip
        if widths is None:
            widths = checkpoint_widths(model)
            if widths is None:
                raise ValueError("the checkpoint's recipe names no nested_bits; give the widths to choose from")
        self.model, self.widths, self.cost, self.backend = model, check_widths(widths), cost, backend
        self.budget_given = check_bits_budget(budget)
        names, sizes, choices, bits = [], [], [], []
        for name, layer in layers.items():
            cost = {w: slice_bits_per_weight(layer.spec, w, layer.in_features, layer.out_features, self.cost)
                    for w in self.widths if w <= layer.spec.code_bits}  # fmt: skip
            if not cost:
                raise ValueError(f"layer {name!r} stores {layer.spec.code_bits}-bit codes: none of the widths "
                                 f"{list(self.widths)} is a slice of them")  # fmt: skip
            widest = {c: w for w, c in reversed(cost.items())}  # of the widths that cost the same, the widest
            names.append(name)
            sizes.append(layer.in_features * layer.out_features)
            choices.append(tuple(w for w in cost if widest[cost[w]] == w))
            bits.append({w: cost[w] for w in choices[-1]})
        self.names = tuple(names)
        self.space = SearchSpace(self.names, tuple(sizes), tuple(choices), tuple(bits), self.budget_given,
                                 what="width")  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """What makes this search this one, beside the genetic algorithm's settings (a resume must match)."""
        return {"space": {"kind": "bits", "widths": list(self.widths), "budget": self.budget_given,
                          "cost": self.cost, "backend": self.backend},
                "model": {"weights": self.weights_digest}}  # fmt: skip

    @cached_property
    def weights_digest(self) -> str:
        """Names the weights searched, so a resumed search refuses another checkpoint's state."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return digest.hexdigest()[:16]

    def initial(self) -> list[Genome]:
        """The widest uniform width within budget, to seed the first population."""
        for width in self.widths:
            uniform = tuple(width if width in c else c[-1] for c in self.space.choices)
            if self.space.within_budget(uniform):
                return [uniform]
        return []

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Leaves the model serving the widths it came with."""
        before = served_widths(self.model)
        try:
            yield
        finally:
            prepare_for_inference(self.model, "reference")
            apply_served_bits(self.model, exact_plan(before))

    def candidate(self, genome: Genome) -> nn.Module:
        """The nested model serving `genome`'s widths, as `ditq.load(path, bits=plan)` serves them."""
        prepare_for_inference(self.model, "reference")  # no kernel buffers of the previous widths to drop
        apply_served_bits(self.model, self.output(genome))
        return prepare_for_inference(self.model, self.backend)

    def output(self, genome: Genome) -> dict[str, int]:
        """The served-bits plan of `genome`: every layer's name (as an exact pattern) → its width."""
        return exact_plan(self.space.assignment(genome))

