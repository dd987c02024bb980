"""diffusers transformers as ditq architectures, and calibration from a pipeline's own denoising loop.

Four families get an adapter: DiT, PixArt-α/Σ, SD3 and FLUX. Each knows
- which modules stay in high precision by default (patch/time/text embedders, the adaLN modulation
  Linears, the output norm and projection: what Q-DiT, PTQ4DiT and SVDQuant keep in 16 bits);
- how to rebuild the transformer from its diffusers config alone, so a ditq checkpoint of a quantized
  transformer loads with `ditq.load(path)` without the original weights (parameters are built on the meta
  device; buffers that the config computes, such as sin-cos position tables, are built for real);
- how to drive it on random inputs of the right shapes (`run`), which is what `trace_input_groups` uses to
  find the Linears that read one tensor: q/k/v, FLUX's add_q/k/v_proj, its single blocks' q/k/v + proj_mlp;
- per block type, what produces a Linear's input where SVDQuant's smoothing folds into it (`fold_sites`,
  `ditq.kernels.folding`): the adaLN rows of a modulated input, the value rows of an attention output.

diffusers itself is imported on first use only. Three lines quantize a pipeline's transformer:

    calib = calibrate_pipeline(pipe, prompts=["a cat", "a city at night"], steps=20)
    ditq.quantize(pipe.transformer, ditq.RTN(w_bits=8, a_bits=8), calib=calib)
    ditq.save(pipe.transformer, "transformer-w8a8.safetensors")
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ditq.adapters import (
    ADAPTERS,
    Adapter,
    FoldSite,
    Rows,
    RunFn,
    modulation_site,
    register_adapter,
    trace_input_groups,
)
from ditq.calib import CalibData, calibrate
from ditq.checks import check_count

__all__ = ["DiffusersAdapter", "calibrate_pipeline", "diffusers_adapter", "load_pipeline", "SUPPORTED"]


@dataclass(frozen=True)
class DiffusersAdapter(Adapter):
    """One diffusers transformer class. Subclasses say how to make a forward call's inputs."""

    class_name: str = ""
    timestep_scale: float = 1.0  # what one unit of the model's `timestep` is in 1000-step units

    def handles(self, model: nn.Module) -> bool:
        cls = type(model)
        return cls.__name__ == self.class_name and cls.__module__.startswith("diffusers.")

    def config(self, model: nn.Module) -> dict[str, Any]:
        """The config entries the class's constructor takes (JSON types), `_class_name` and the diffusers
        version that built the model. Entries that describe how a model was loaded rather than built
        (`quantization_config`, added by `from_pretrained(..., quantization_config=...)`) are left out: the
        file rebuilds the full-precision skeleton and swaps its own quantized layers in."""
        import diffusers

        accepted = _constructor_fields(type(model))
        built = {k: _jsonable(v) for k, v in model.config.items() if k in accepted}
        return {"_class_name": self.class_name, "_diffusers_version": diffusers.__version__, **built}

    def build(self, config: dict[str, Any]) -> nn.Module:
        """The transformer a config describes, parameters on meta (filled by `load_state_dict(assign=True)`)."""
        import diffusers

        name = config.get("_class_name", self.class_name)
        if name != self.class_name:
            raise ValueError(
                f"config names class {name!r}, the {self.name!r} adapter builds {self.class_name}"
            )
        cls = getattr(diffusers, self.class_name)
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - _constructor_fields(cls))
        if unknown:
            written = config.get("_diffusers_version")
            hint = "" if written in (None, diffusers.__version__) else (
                f"; the file was written with diffusers {written}: load it with that version")
            raise ValueError(
                f"{self.class_name} (diffusers {diffusers.__version__}) takes no config fields {unknown}{hint}"
            )
        with _parameters_on_meta():
            return cls(**kwargs).eval()

    def step_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        """The call's `timestep` in the 0..1000 scale every family's scheduler counts in."""
        t = kwargs.get("timestep")
        if not isinstance(t, torch.Tensor) or not t.numel():
            return None
        return int(round(float(t.reshape(-1)[0]) * self.timestep_scale))

    def run(
        self,
        model: nn.Module,
        *,
        batch: int = 1,
        steps: int = 1,
        seed: int = 0,
        size: int | None = None,
        text_tokens: int = 8,
    ) -> torch.Tensor:
        """Call the model `steps` times on seeded random inputs (timesteps spread from noisy to clean);
        returns the last output. `size` is the latent side (default: the config's sample size)."""
        if batch <= 0 or steps <= 0 or text_tokens <= 0:
            raise ValueError(
                f"batch, steps and text_tokens must be positive, got {batch}, {steps}, {text_tokens}"
            )
        param = next(model.parameters())
        gen = torch.Generator().manual_seed(seed)
        size = size or self.default_size(model)
        out = None
        with torch.no_grad():
            for i in range(steps):
                t = 1.0 - i / steps  # in (0, 1]
                inputs = self.example_inputs(model, batch, size, text_tokens, t, gen)
                inputs = {k: _to(v, param) for k, v in inputs.items()}
                out = model(**inputs, return_dict=False)[0]
        return out

    def default_size(self, model: nn.Module) -> int:
        return int(model.config.sample_size)

    def example_inputs(
        self, model: nn.Module, batch: int, size: int, text_tokens: int, t: float, gen: torch.Generator
    ) -> dict[str, Any]:
        raise NotImplementedError

    def input_groups(self, model: nn.Module, run: RunFn | None = None) -> list[tuple[str, ...]]:
        """Linears reading one tensor, traced on one small random call unless `run` is given."""
        return trace_input_groups(model, run or (lambda m: self.run(m, size=self.trace_size(m))))

    def trace_size(self, model: nn.Module) -> int:
        return min(self.default_size(model), 2 * int(model.config.patch_size))

    def gemm_groups(self, model: nn.Module) -> list[tuple[str, ...]]:
        """Per attention: q, k and v of a self-attention, k and v of a cross-attention (q reads the image tokens),
        the added q, k and v of a joint attention (the text tokens); a FLUX single block's proj_mlp beside its
        q, k and v (one normalised input for all four)."""
        groups, taken = [], set()
        for name, module in model.named_modules():
            if type(module).__name__ == "FluxSingleTransformerBlock":
                groups.append((*_projections(f"{name}.attn", "to_q", "to_k", "to_v"), f"{name}.proj_mlp"))
                taken.add(f"{name}.attn")
            elif name not in taken and not getattr(module, "fused_projections", False):
                own = ("to_k", "to_v") if getattr(module, "is_cross_attention", False) else ("to_q", "to_k", "to_v")
                for names in (own, ("add_q_proj", "add_k_proj", "add_v_proj")):
                    if all(isinstance(getattr(module, n, None), nn.Module) for n in names):
                        groups.append(_projections(name, *names))
        return groups

    def fold_sites(self, model: nn.Module) -> list[FoldSite]:
        """The fold sites of every block of a type `BLOCK_FOLD_SITES` declares."""
        sites = []
        for name, module in model.named_modules():
            declare = BLOCK_FOLD_SITES.get(type(module).__name__)
            if declare is not None and type(module).__module__.startswith("diffusers."):
                sites += declare(name, module)
        return sites


def _latent(batch: int, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=gen)  # (B, C, H, W)


@dataclass(frozen=True)
class DiTAdapter(DiffusersAdapter):
    def example_inputs(self, model, batch, size, text_tokens, t, gen):
        c = model.config
        labels = torch.randint(0, int(c.num_embeds_ada_norm), (batch,), generator=gen)
        return {
            "hidden_states": _latent(batch, c.in_channels, size, gen),
            "timestep": torch.full((batch,), int(t * 999)),
            "class_labels": labels,
        }


@dataclass(frozen=True)
class PixArtAdapter(DiffusersAdapter):
    def example_inputs(self, model, batch, size, text_tokens, t, gen):
        c = model.config
        inputs = {
            "hidden_states": _latent(batch, c.in_channels, size, gen),
            "encoder_hidden_states": torch.randn(batch, text_tokens, c.caption_channels, generator=gen),
            "timestep": torch.full((batch,), int(t * 999)),
        }
        if model.use_additional_conditions:
            side = float(size * 8)
            inputs["added_cond_kwargs"] = {
                "resolution": torch.tensor([[side, side]] * batch),
                "aspect_ratio": torch.ones(batch, 1),
            }
        else:
            inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return inputs


@dataclass(frozen=True)
class SD3Adapter(DiffusersAdapter):
    def example_inputs(self, model, batch, size, text_tokens, t, gen):
        c = model.config
        return {
            "hidden_states": _latent(batch, c.in_channels, size, gen),
            "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=gen),
            "timestep": torch.full((batch,), t * 1000.0),
        }


@dataclass(frozen=True)
class FluxAdapter(DiffusersAdapter):
    """FLUX sees packed latents: `size`×`size` tokens of `in_channels` (2×2 patches of 16 VAE channels)."""

    def default_size(self, model: nn.Module) -> int:
        return 64  # 1024 px: 128×128 latents packed 2×2 → 64×64 = 4096 tokens

    def trace_size(self, model: nn.Module) -> int:
        return 2

    def example_inputs(self, model, batch, size, text_tokens, t, gen):
        c = model.config
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()  # (HW, 3)
        inputs = {
            "hidden_states": torch.randn(batch, size * size, c.in_channels, generator=gen),
            "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=gen),
            "timestep": torch.full((batch,), t),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(text_tokens, 3),
        }
        if c.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
        return inputs


# ---- where SVDQuant's smoothing folds: per block type ------------------------------------------------------

# processors that compute softmax(q kᵀ)·v of to_v's (and add_v_proj's) rows as they are and hand it to to_out.0
# (and to_add_out); q and k alone are normalised
_VALUE_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "JointAttnProcessor2_0", "FluxAttnProcessor")


def _attention_output(prefix: str, attn: nn.Module) -> list[FoldSite]:
    """to_out.0 (and a joint attention's to_add_out: one softmax mixes image and context tokens, so both read the
    mix) reads the value rows of to_v (and add_v_proj)."""
    if (type(attn.processor).__name__ not in _VALUE_PROCESSORS or getattr(attn, "fused_projections", False)
            or getattr(attn, "to_out", None) is None):  # fmt: skip
        return []
    readers = (f"{prefix}.to_out.0",) + ((f"{prefix}.to_add_out",) if getattr(attn, "to_add_out", None) else ())
    values = [name for name in ("to_v", "add_v_proj") if getattr(attn, name, None) is not None]
    return [FoldSite(readers, tuple(Rows(f"{prefix}.{v}", 0, getattr(attn, v).out_features) for v in values))]


def _projections(prefix: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{name}" for name in names)


def _basic_block(prefix: str, block: nn.Module) -> list[FoldSite]:
    """DiT's and PixArt's BasicTransformerBlock. With adaLN-Zero (DiT) attn1's q/k/v read norm1's modulation (chunks
    0, 1 of norm1.linear) and the feed-forward's first Linear norm3's (chunks 3, 4); PixArt's adaLN-single adds a
    table to one timestep projection that every block shares: its modulation does not fold per block."""
    sites = [s for name in ("attn1", "attn2") if getattr(block, name, None) is not None
             for s in _attention_output(f"{prefix}.{name}", getattr(block, name))]  # fmt: skip
    if block.norm_type == "ada_norm_zero" and block.pos_embed is None and not block.only_cross_attention:
        ada, width = f"{prefix}.norm1.linear", block.norm1.linear.out_features // 6
        sites += [modulation_site(_projections(f"{prefix}.attn1", "to_q", "to_k", "to_v"), ada, width, shift=0, scale=1),
                  modulation_site((f"{prefix}.ff.net.0.proj",), ada, width, shift=3, scale=4)]
    return sites


def _joint_block(prefix: str, block: nn.Module) -> list[FoldSite]:
    """SD3's JointTransformerBlock and FLUX's double block: image tokens through norm1 (adaLN-Zero, chunks 0, 1 to
    q/k/v, 3, 4 to the feed-forward; SD3.5's 9-chunk norm1 adds 6, 7 to attn2's q/k/v), context tokens through
    norm1_context (adaLN-Zero alike, or, in SD3's last block, a continuous adaLN whose chunks are scale, shift)."""
    attn = f"{prefix}.attn"
    sites = _attention_output(attn, block.attn)
    attn2 = getattr(block, "attn2", None)
    sites += [] if attn2 is None else _attention_output(f"{prefix}.attn2", attn2)
    chunks = {"AdaLayerNormZero": 6, "SD35AdaLayerNormZeroX": 9}.get(type(block.norm1).__name__)
    if chunks:
        ada, width = f"{prefix}.norm1.linear", block.norm1.linear.out_features // chunks
        sites += [modulation_site(_projections(attn, "to_q", "to_k", "to_v"), ada, width, shift=0, scale=1),
                  modulation_site((f"{prefix}.ff.net.0.proj",), ada, width, shift=3, scale=4)]
        if chunks == 9:
            sites.append(modulation_site(_projections(f"{prefix}.attn2", "to_q", "to_k", "to_v"), ada, width, 6, 7))
    context = type(block.norm1_context).__name__
    if getattr(block.attn, "add_q_proj", None) is not None and context in ("AdaLayerNormZero", "AdaLayerNormContinuous"):
        ada = f"{prefix}.norm1_context.linear"
        added = _projections(attn, "add_q_proj", "add_k_proj", "add_v_proj")
        if context == "AdaLayerNormZero":
            width = block.norm1_context.linear.out_features // 6
            sites.append(modulation_site(added, ada, width, shift=0, scale=1))
            if getattr(block, "ff_context", None) is not None:
                sites.append(modulation_site((f"{prefix}.ff_context.net.0.proj",), ada, width, shift=3, scale=4))
        else:
            sites.append(modulation_site(added, ada, block.norm1_context.linear.out_features // 2, shift=1, scale=0))
    return sites


def _flux_single_block(prefix: str, block: nn.Module) -> list[FoldSite]:
    """FLUX's single block: q/k/v and proj_mlp read norm's modulation (chunks 0, 1 of 3); proj_out reads the
    attention output beside a GELU's: nothing folds there."""
    readers = (*_projections(f"{prefix}.attn", "to_q", "to_k", "to_v"), f"{prefix}.proj_mlp")
    return [modulation_site(readers, f"{prefix}.norm.linear", block.norm.linear.out_features // 3, shift=0, scale=1)]


BLOCK_FOLD_SITES = {
    "BasicTransformerBlock": _basic_block,
    "JointTransformerBlock": _joint_block,
    "FluxTransformerBlock": _joint_block,
    "FluxSingleTransformerBlock": _flux_single_block,
}

# Patterns each match at least one module of their family (a recipe's skip patterns must); the second
# tuple names the blocks' adaLN modulation Linears among them (diffusers DiT's norm1 also holds the
# timestep and class embedders; PixArt's single adaLN is shared by all blocks).
_DIT_MODULATION = ("transformer_blocks.*.norm1.linear",)
_DIT_SKIP = ("pos_embed", "transformer_blocks.*.norm1.emb*", *_DIT_MODULATION, "proj_out_1", "proj_out_2")
_PIXART_MODULATION = ("adaln_single.linear",)
_PIXART_SKIP = ("pos_embed", "adaln_single.emb*", *_PIXART_MODULATION, "caption_projection*", "proj_out")
_SD3_MODULATION = ("transformer_blocks.*.norm1*",)
_SD3_SKIP = ("pos_embed", "time_text_embed*", "context_embedder", *_SD3_MODULATION, "norm_out*", "proj_out")
_FLUX_MODULATION = ("transformer_blocks.*.norm1*", "single_transformer_blocks.*.norm")
_FLUX_SKIP = ("x_embedder", "context_embedder", "time_text_embed*", *_FLUX_MODULATION, "norm_out*",
              "proj_out")

SUPPORTED: dict[str, DiffusersAdapter] = {
    a.class_name: a
    for a in (
        DiTAdapter("diffusers_dit", _DIT_SKIP, _DIT_MODULATION, class_name="DiTTransformer2DModel"),
        PixArtAdapter("diffusers_pixart", _PIXART_SKIP, _PIXART_MODULATION,
                      class_name="PixArtTransformer2DModel"),
        SD3Adapter("diffusers_sd3", _SD3_SKIP, _SD3_MODULATION, class_name="SD3Transformer2DModel"),
        FluxAdapter("diffusers_flux", _FLUX_SKIP, _FLUX_MODULATION, class_name="FluxTransformer2DModel",
                    timestep_scale=1000.0),
    )
}
for _adapter in SUPPORTED.values():
    if _adapter.name not in ADAPTERS:  # a re-import (importlib test mode) must not register twice
        register_adapter(_adapter)


def diffusers_adapter(model: nn.Module) -> DiffusersAdapter:
    """The adapter of a supported diffusers transformer; anything else is refused naming what is supported."""
    for adapter in SUPPORTED.values():
        if adapter.handles(model):
            return adapter
    raise ValueError(
        f"{type(model).__name__} is not a supported diffusers transformer; ditq supports "
        f"{', '.join(SUPPORTED)}"
    )


# ---- pipelines --------------------------------------------------------------------------------------


def calibrate_pipeline(
    pipe: Any,
    *,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    rows_per_layer: int = 2048,
    progress: bool = False,
    **call_kwargs: Any,
) -> CalibData:
    """CalibData for `pipe.transformer`, recorded while the pipeline denoises `prompts` (text pipelines)
    or `class_labels` (DiTPipeline) for `steps` steps: the inputs the transformer sees in real use,
    guidance included. Extra keyword arguments go to the pipeline call (height, width, ...)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(
            f"{type(pipe).__name__} has no transformer (UNet pipelines are not supported); "
            f"ditq supports {', '.join(SUPPORTED)}"
        )
    diffusers_adapter(transformer)
    if (prompts is None) == (class_labels is None):
        raise ValueError(
            "give exactly one of prompts= (text-to-image pipelines) or class_labels= (DiTPipeline)"
        )
    conditions = list(prompts if prompts is not None else class_labels)
    if not conditions:
        raise ValueError("calibration needs at least one prompt or class label")
    check_count("steps", steps)
    call = dict(call_kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    if prompts is not None:
        call |= {"prompt": [str(p) for p in conditions], "output_type": "latent"}
    else:
        call |= {"class_labels": [int(c) for c in conditions], "output_type": "np"}
    pipe.set_progress_bar_config(disable=not progress)

    def run(_model: nn.Module) -> Any:
        return pipe(**call)

    data = calibrate(transformer, run=run, rows_per_layer=rows_per_layer, seed=seed)
    data.n_samples = len(conditions)
    return data


def load_pipeline(path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A pipeline saved with `save_pretrained` in a local folder (nothing is downloaded)."""
    from pathlib import Path

    from diffusers import DiffusionPipeline

    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"--pipeline {path}: not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    return pipe.to(device)


# ---- internals --------------------------------------------------------------------------------------


@contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device but real buffers: a skeleton that
    `load_state_dict(assign=True)` fills, whose computed buffers (not in any state dict) are real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        with torch.device("cpu"):  # inside ditq.io's meta context, buffers still need real storage
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _constructor_fields(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _to(value: Any, like: torch.Tensor) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, like) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(like.device, like.dtype if value.is_floating_point() else value.dtype)
    return value
