"""Kernel backends for `QuantLinear`, chosen once per module by `prepare_for_inference`.

A backend has a `supports(module)` check (None, or the reason it cannot run that layer), a `convert`
that may add kernel buffers (non-persistent: checkpoints stay in the canonical layout, SPEC §9) and a
`forward(module, x)`. `prepare_for_inference(model, backend)` picks the backend for every `QuantLinear`
and converts it; `QuantLinear.forward` then calls that backend with no dispatch logic of its own, so
`torch.compile(fullgraph=True)` and CUDA graphs trace straight through. A layer the backend cannot run
keeps the reference, and the reason is logged (one warning per reason).

Backends here:
- `"reference"` (alias `"emulated"`): the oracle custom op `ditq::quant_linear`, dequantizing the packed
  weight on every call. What every fast kernel is tested against; the default after quantize and load.
- `"dequantized"`: keeps Ŵ dequantized in the compute dtype (a non-persistent buffer) and runs the
  activation fake-quant as ordinary ops that the compiler fuses. For search and evaluation, where speed
  matters and memory does not; outputs equal the reference up to matmul rounding.
- `"lowbit"` (`ditq.kernels.lowbit`): a Triton GEMM that reads the packed int2–int4/ternary codes directly
  (any group size, any activation spec); weights stay 2–4-bit in memory. Fastest where a GEMM is bound by
  its weight bytes (few tokens); sm_80+.
- `"fp8"` / `"fp8-cached"` (`ditq.kernels.fp8`): W4A8-FP8 on sm_89+ for symmetric int2–int4 or ternary
  weights with dynamic per-token FP8 activations: per-channel layers through cuBLAS FP8 on e4m3 weight codes,
  per-group ones (groups a multiple of 32) through the lowbit kernel's FP8 mode; `"fp8"` sends few-row
  calls to the lowbit kernel. `"fp8-gluon"` is `"fp8"` but for the layers the Gluon W4A8 kernel takes on sm_90
  (`ditq.kernels.hopper`: per-channel or g64/g128 layers without a low-rank branch): every call of theirs runs there
  on codes re-packed at prepare, the packed codes parked in host memory; it is a backend of its own because the
  kernel, exact on an H100, runs at 0.64–0.76× cuBLAS FP8 there. Preparing a model for them installs a
  `torch.compile` graph pass (`ditq.kernels.fusion`) that folds what produces a layer's input (LayerNorm + adaLN
  modulate and the residual add before it, a GELU) into the layer's Triton input pre-pass, on any model (and, for
  `"fp8-cached"`, runs the GEMMs of layers that read one input as one: `ditq.kernels.joined`); and it
  folds SVDQuant's smoothing into the producer of a layer's input where the architecture's adapter says what that is
  (`ditq.kernels.folding`), so the pre-pass no longer multiplies by its reciprocal. The reference and dequantized
  backends leave the model's weights as they are (the oracle, and what search and evaluation save): their x / smooth
  is an ordinary op that the compiler fuses into x's producer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ditq.adapters import adapter_for
from ditq.kernels import fp8, hopper, lowbit, ops
from ditq.kernels.folding import fold_smoothing
from ditq.kernels.fusion import install_fusion_pass
from ditq.kernels.joined import join_gemms
from ditq.kernels.reference import group_linear, linear_reference, quantize_activations
from ditq.quant.qlinear import BACKEND_FORWARDS, QuantLinear

__all__ = [
    "BACKENDS",
    "Backend",
    "group_linear",
    "linear_reference",
    "prepare_for_inference",
    "quantize_activations",
    "register_backend",
]

logger = logging.getLogger("ditq.kernels")

ALIASES = {"emulated": "reference"}


@dataclass(frozen=True)
class Backend:
    """How one kind of kernel runs a `QuantLinear`: whether it can, what it precomputes, and the call."""

    name: str
    forward: Callable[[QuantLinear, torch.Tensor], torch.Tensor]
    supports: Callable[[QuantLinear], str | None] = lambda module: None
    convert: Callable[[QuantLinear, torch.dtype], dict[str, torch.Tensor]] = lambda module, dtype: {}
    # buffers `.to(dtype)` must not cast (FP8 codes, float32 scales)
    fixed_dtype_buffers: tuple[str, ...] = ()
    # whether `prepare_for_inference` installs the graph pass that folds producers into FP8 input pre-passes
    # (`ditq.kernels.fusion`), and shares equal `shared_input_buffers` among layers so that a compiled graph
    # sees one input for them and quantizes an input read by several such layers once
    fuses_producers: bool = False
    shared_input_buffers: tuple[str, ...] = ()
    # whether `prepare_for_inference` folds SVDQuant's smoothing into the producers of the layers it runs
    folds_smoothing: bool = False
    # a kernel buffer holding the codes exactly on the device: `qweight` is then parked in host memory
    codes_copy: str | None = None
    # whether `prepare_for_inference` joins the weights of layers that read one input, where the architecture's
    # adapter declares them (`ditq.kernels.joined`), so that the fusion pass can run their GEMMs as one
    joins_gemms: bool = False


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Make a backend available to `prepare_for_inference` (and so to `QuantLinear.forward`)."""
    if not isinstance(backend.name, str) or not backend.name or backend.name in ALIASES:
        raise ValueError(f"backend name {backend.name!r} must be a non-empty string and not an alias")
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered (pass replace=True)")
    BACKENDS[backend.name] = backend
    BACKEND_FORWARDS[backend.name] = backend.forward


def prepare_for_inference(
    model: nn.Module,
    backend: str = "reference",
    *,
    dtype: torch.dtype | None = None,
    fast_accumulation: bool | None = None,
    fold: bool = True,
    join: bool = True,
) -> nn.Module:
    """Choose `backend` for every QuantLinear of `model` and convert it; returns the model.

    `dtype` is the compute dtype of buffers a backend precomputes (default: each layer's float dtype,
    the dtype of its bias or low-rank factors, else float32). Calling it again switches backends and
    drops the kernel buffers the previous one added. For the FP8 backends it installs their `torch.compile`
    graph pass (`ditq.kernels.fusion`), which leaves graphs without their ops alone.
    `fast_accumulation` (the FP8 backends only; default `fp8.DEFAULT_FAST_ACCUMULATION`) lets cuBLAS's FP8
    GEMMs keep the tensor cores' partial sums unpromoted along K. `fold=False` keeps the FP8 backends from
    folding smoothing into producers (`ditq.kernels.folding`; to measure what it saves); a fold made by an
    earlier call stays, whatever the backend, and is never made twice. `join=False` keeps "fp8-cached" from
    joining the weights of layers that read one input (`ditq.kernels.joined`; likewise to measure it).
    """
    name = ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {sorted([*BACKENDS, *ALIASES])}")
    if fast_accumulation is not None and name not in fp8.FP8_BACKENDS:
        raise ValueError(f"fast_accumulation is an option of the FP8 backends {list(fp8.FP8_BACKENDS)}, not of {backend!r}")
    if fast_accumulation is not None and not isinstance(fast_accumulation, bool):
        raise TypeError(f"fast_accumulation must be True, False or None, got {fast_accumulation!r}")
    for option, value in (("fold", fold), ("join", join)):
        if not isinstance(value, bool):
            raise TypeError(f"{option} must be True or False, got {value!r}")
    fast = fp8.DEFAULT_FAST_ACCUMULATION if fast_accumulation is None else fast_accumulation
    chosen = BACKENDS[name]
    if chosen.folds_smoothing and fold:
        folded = fold_smoothing(model, adapter_for(model).fold_sites(model), lambda m: chosen.supports(m) is None)
        logger.info("folded the smoothing of %d layer(s) into the producers of their inputs", folded)
    if chosen.fuses_producers:
        install_fusion_pass()
    declined: Counter[str] = Counter()
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        module.drop_kernel_buffers()
        reason = chosen.supports(module)
        if reason is not None:
            declined[reason] += 1
        target = BACKENDS["reference"] if reason else chosen
        if target.name in fp8.FP8_BACKENDS:  # before `convert`: "fp8-gluon" chooses its GEMM by it
            module.fast_accumulation = fast
        extra = target.convert(module, dtype or _float_dtype(module))
        for buffer, tensor in extra.items():
            module.register_buffer(buffer, tensor, persistent=False)
        module.kernel_buffers = tuple(extra)
        module.fixed_dtype_buffers = tuple(b for b in target.fixed_dtype_buffers if b in extra)
        module.backend = target.name
        if target.codes_copy in extra:
            module.park_codes()
    for reason, count in declined.items():
        logger.warning("backend %r cannot run %d layer(s) (%s); they keep the reference", name, count, reason)
    _share_equal(model, chosen.shared_input_buffers)
    if chosen.joins_gemms and join:
        joined = join_gemms(model, adapter_for(model).gemm_groups(model))
        logger.info("joined the weights of %d layer(s) that read one input with others", joined)
    return model


def _share_equal(model: nn.Module, names: tuple[str, ...]) -> None:
    """Make layers whose buffer `name` holds equal values hold one tensor (an input group's smoothing)."""
    for name in names:
        kept: list[torch.Tensor] = []
        for module in model.modules():
            t = module._buffers.get(name) if isinstance(module, QuantLinear) else None
            if t is None:
                continue
            same = next((k for k in kept if k.shape == t.shape and k.dtype == t.dtype and k.device == t.device
                         and torch.equal(k, t)), None)  # fmt: skip
            if same is None:
                kept.append(t)
            else:
                module._buffers[name] = same


def _float_dtype(module: QuantLinear) -> torch.dtype:
    for t in (module.bias, module.lowrank_up):
        if t is not None:
            return t.dtype
    return torch.float32


def _reference_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return ops.quant_linear(
        x,
        m.qweight,
        m.scales,
        m.zeros,
        m.bias,
        m.input_smooth,
        m.lowrank_down,
        m.lowrank_up,
        m.act_scale,
        m.act_zero,
        m.spec_json,
    )


def _dequantized_forward(m: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return linear_reference(
        x, m.weight_dq, m.bias, m.input_smooth, m.lowrank_down, m.lowrank_up, m.act_scale, m.act_zero, m.spec
    )


register_backend(Backend("reference", _reference_forward))
register_backend(
    Backend(
        "dequantized",
        _dequantized_forward,
        convert=lambda m, dtype: {"weight_dq": m.dequantized_weight(dtype)},
    )
)
register_backend(Backend("lowbit", lowbit.lowbit_forward, supports=lowbit.lowbit_support))
_PER_CALL_FP8 = Backend(
    "fp8",
    fp8.per_call_forward,
    supports=fp8.fp8_support,
    convert=lambda m, dtype: fp8.weight_scale(m),
    fixed_dtype_buffers=("fp8_scale_w", *fp8.LOWRANK_BUFFERS, "lowrank_up_fp8", "weight_row_shift", "inv_smooth"),
    fuses_producers=True,
    shared_input_buffers=fp8.INPUT_BUFFERS,
    folds_smoothing=True,
)
register_backend(_PER_CALL_FP8)
# "fp8" but with the Gluon GEMM on sm_90 where it runs a layer (its codes re-packed, the packed ones parked)
register_backend(dataclasses.replace(_PER_CALL_FP8, name="fp8-gluon", codes_copy=hopper.WGMMA_CODES,
                                     convert=lambda m, dtype: fp8.gluon_or_per_call_buffers(m)))
register_backend(
    Backend(
        "fp8-cached",
        fp8.fp8_linear,
        supports=fp8.fp8_support,
        convert=lambda m, dtype: fp8.expanded_weight(m),
        fixed_dtype_buffers=("fp8_scale_w", "weight_fp8", *fp8.LOWRANK_BUFFERS, "inv_smooth"),
        codes_copy="weight_fp8",
        joins_gemms=True,
        fuses_producers=True,
        shared_input_buffers=fp8.INPUT_BUFFERS,
        folds_smoothing=True,
    )
)
