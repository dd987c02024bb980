"""Architecture adapters: what ditq must know about a model family to save, calibrate and quantize it.

An adapter says how to rebuild the skeleton from a JSON config, which modules stay in high precision by
default (and which of those are the adaLN modulation, which some methods quantize), how to drive the model
on inputs (calibration, evaluation), which Linears read the same input (SVDQuant shares one smoothing
vector, one activation quantizer and one low-rank down-projection across such a group) and what produces a
Linear's input where SVDQuant's smoothing can be folded into it (`FoldSite`, read by `ditq.kernels.folding`).
Zoo models (DiT, Large-DiT) are recognised by class; any other `nn.Module` gets "generic", which skips nothing
and needs the caller's `run(model)` to see inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ditq.diffusion import sample_images
from ditq.models.configs import build
from ditq.models.dit import DiT
from ditq.models.large_dit import LargeDiT

RunFn = Callable[[nn.Module], Any]

# Embedders, the final layer and the adaLN modulation stay in high precision unless a recipe says otherwise
# (SPEC §2; Q-DiT only touches the transformer blocks' attention and MLP linears). DiT and Large-DiT share
# these module names (large_dit.py's docstring lists them). The final layer's modulation stays with the final
# layer.
_ZOO_MODULATION: tuple[str, ...] = ("*adaLN_modulation*",)
_ZOO_SKIP: tuple[str, ...] = ("x_embedder*", "t_embedder*", "y_embedder*", "final_layer*", *_ZOO_MODULATION)


@dataclass(frozen=True)
class Rows:
    """Output rows [start, stop) of a producer: a Linear's (nn.Linear or QuantLinear) or a norm's affine weight.
    `gain`: the rows are adaLN's `scale`, read as (1 + scale), so a fold divides 1 + scale, not scale."""

    module: str
    start: int
    stop: int
    gain: bool = False


@dataclass(frozen=True)
class FoldSite:
    """A tensor h that `readers` (every Linear that reads it) take as input, and the producer rows it is made of:
    h/s is h with each of `producers`' rows divided by s (a gain's 1 + scale divided by s), exactly but for
    rounding, so readers that share the smoothing s can read h/s instead of dividing at run time."""

    readers: tuple[str, ...]
    producers: tuple[Rows, ...]


def modulation_site(readers: tuple[str, ...], linear: str, width: int, shift: int, scale: int) -> FoldSite:
    """h = norm(x)·(1 + scale) + shift with shift and scale the chunks `shift` and `scale` (of `width` rows each)
    of the adaLN Linear `linear`'s output."""
    return FoldSite(readers, (Rows(linear, shift * width, (shift + 1) * width),
                              Rows(linear, scale * width, (scale + 1) * width, gain=True)))


@dataclass(frozen=True)
class Adapter:
    """The generic adapter; zoo families subclass it. `name` is what a checkpoint stores as its "arch".

    `default_skip`: the patterns of the modules that stay in high precision unless a recipe lists its own;
    `modulation`: those of them that name the blocks' adaLN modulation Linears, which a recipe with
    `quantize_modulation=True` quantizes (SVDQuant and TerDiT do)."""

    name: str
    default_skip: tuple[str, ...] = ()
    modulation: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stray = sorted(set(self.modulation) - set(self.default_skip))
        if stray:
            raise ValueError(f"adapter {self.name!r}: modulation patterns {stray} are not default skips")

    def skip(self, quantize_modulation: bool = False) -> tuple[str, ...]:
        """The default skip patterns, without the modulation's when it is to be quantized."""
        if not quantize_modulation:
            return self.default_skip
        return tuple(p for p in self.default_skip if p not in self.modulation)

    def handles(self, model: nn.Module) -> bool:
        return False

    def config(self, model: nn.Module) -> dict[str, Any] | None:
        """JSON-able constructor kwargs that rebuild `model`'s skeleton (None: the caller must build it)."""
        return None

    def build(self, config: dict[str, Any]) -> nn.Module:
        raise ValueError(
            f"a {self.name!r} model cannot be rebuilt from a file; build the model yourself and pass it as model="
        )

    def run(self, model: nn.Module, **options: Any) -> Any:
        raise ValueError(
            f"ditq does not know how to drive a {type(model).__name__} ({self.name!r} architecture); "
            "pass run=, a callable that runs the model on your inputs"
        )

    def step_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        """The diffusion timestep of one call of the model's forward, if the architecture has one."""
        return None

    def input_groups(self, model: nn.Module, run: RunFn | None = None) -> list[tuple[str, ...]]:
        """Groups (≥ 2 names, in module order) of Linears that read the same input tensor, found by tracing
        one `run(model)`."""
        if run is None:
            raise ValueError(
                f"finding shared inputs of a {type(model).__name__} needs run=, a callable that runs it once"
            )
        return trace_input_groups(model, run)

    def fold_sites(self, model: nn.Module) -> list[FoldSite]:
        """Where a Linear's smoothing folds into the producer of its input (none known for a generic model)."""
        return []

    def gemm_groups(self, model: nn.Module) -> list[tuple[str, ...]]:
        """Groups of Linears (names) whose calls read one input tensor, declared without running the model: the
        FP8 backends run each group's GEMMs as one (`ditq.kernels.joined`). None known for a generic model."""
        return []


@dataclass(frozen=True)
class ZooAdapter(Adapter):
    """A class-conditional zoo transformer: rebuilt from `model.config`, driven by the diffusion sampler."""

    model_class: type[nn.Module] = nn.Module
    # Linears inside one block that read the same normalised tokens (Large-DiT's SwiGLU gate and up).
    block_groups: tuple[tuple[str, ...], ...] = ()

    def handles(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_class)

    def config(self, model: nn.Module) -> dict[str, Any]:
        return dict(model.config)

    def build(self, config: dict[str, Any]) -> nn.Module:
        return build(self.name, config)

    def run(
        self,
        model: nn.Module,
        *,
        n_samples: int = 32,
        steps: int = 25,
        cfg_scale: float = 1.5,
        sampler: str = "ddim",
        seed: int = 0,
        progress: bool = False,
    ) -> torch.Tensor:
        """Sample `n_samples` images with labels spread evenly over the classes; returns them."""
        if n_samples <= 0:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        labels = torch.arange(n_samples) % model.num_classes
        return sample_images(
            model, labels, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, progress=progress
        )

    def step_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        """`t` of forward(x, t, y): one timestep for the whole batch (all samples step together)."""
        t = args[1] if len(args) > 1 else kwargs.get("t")
        return int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else None

    def input_groups(self, model: nn.Module, run: RunFn | None = None) -> list[tuple[str, ...]]:
        """Every adaLN Linear reads SiLU(c) of the same condition c (one tensor per block, equal values);
        `qkv` is already one fused Linear; `block_groups` adds the per-block ones."""
        adaln = tuple(f"blocks.{i}.adaLN_modulation.1" for i in range(len(model.blocks)))
        return [(*adaln, "final_layer.adaLN_modulation.1"), *self.gemm_groups(model)]

    def gemm_groups(self, model: nn.Module) -> list[tuple[str, ...]]:
        """`block_groups` in every block (the adaLN Linears read equal values, but each block its own tensor)."""
        return [tuple(f"blocks.{i}.{name}" for name in group)
                for i in range(len(model.blocks)) for group in self.block_groups]  # fmt: skip


@dataclass(frozen=True)
class DiTZooAdapter(ZooAdapter):
    """The zoo DiT: its blocks' and final layer's folds (`fold_sites`)."""

    def fold_sites(self, model: nn.Module) -> list[FoldSite]:
        """Per `DiTBlock`: qkv reads modulate(norm1(x)) (adaLN chunks 0, 1), fc1 modulate(norm2(x)) (chunks 3, 4),
        proj the attention output, made of qkv's v rows [2D, 3D) (q and k alone are normalised); the final
        layer's Linear reads modulate(norm_final(x)) (its adaLN's chunks 0, 1). fc2 reads a GELU: nothing folds.
        An adaLN followed by TerDiT's RMSNorm (`adaln_norm`) rescales all its rows together: no modulation fold."""
        sites = []
        for i, block in enumerate(model.blocks):
            b, d = f"blocks.{i}", block.attn.proj.in_features
            sites.append(FoldSite((f"{b}.attn.proj",), (Rows(f"{b}.attn.qkv", 2 * d, 3 * d),)))
            if len(block.adaLN_modulation) == 2:  # (SiLU, Linear)
                ada = f"{b}.adaLN_modulation.1"
                sites += [modulation_site((f"{b}.attn.qkv",), ada, d, shift=0, scale=1),
                          modulation_site((f"{b}.mlp.fc1",), ada, d, shift=3, scale=4)]
        final = model.final_layer
        if len(final.adaLN_modulation) == 2:
            sites.append(modulation_site(("final_layer.linear",), "final_layer.adaLN_modulation.1",
                                         final.linear.in_features, shift=0, scale=1))
        return sites


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    if adapter.name in ADAPTERS:
        raise ValueError(f"an adapter named {adapter.name!r} is already registered")
    ADAPTERS[adapter.name] = adapter
    return adapter


GENERIC = register_adapter(Adapter("generic"))
register_adapter(DiTZooAdapter("dit", _ZOO_SKIP, _ZOO_MODULATION, model_class=DiT))
register_adapter(ZooAdapter("large_dit", _ZOO_SKIP, _ZOO_MODULATION, model_class=LargeDiT,
                            block_groups=(("mlp.w1", "mlp.w3"),)))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family (by class), or "generic" for any other module."""
    for adapter in ADAPTERS.values():
        if adapter.handles(model):
            return adapter
    return GENERIC


def get_adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known adapters are {sorted(ADAPTERS)}") from None


@torch.no_grad()
def trace_input_groups(model: nn.Module, run: RunFn) -> list[tuple[str, ...]]:
    """Run the model once and group the Linears whose first call received the very same tensor
    (same storage, offset, shape and strides). Equal values in different tensors are not grouped."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    first_input: dict[str, tuple] = {}
    kept: list[torch.Tensor] = []  # keeps inputs alive so that a freed storage address is never reused

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in first_input:
                x = args[0]
                kept.append(x)
                first_input[name] = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride())

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears]
    try:
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    by_input: dict[tuple, list[str]] = {}
    for name, _ in linears:
        if name in first_input:
            by_input.setdefault(first_input[name], []).append(name)
    return [tuple(names) for names in by_input.values() if len(names) > 1]
