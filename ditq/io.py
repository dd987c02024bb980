"""Checkpoints: any model, quantized or not, as one `.safetensors` file with a JSON header (SPEC §9).

The header (written by `ditq.fileformat`, which hashes tensors and header alike) names the model's
architecture and config when an adapter can rebuild it (zoo models), every quantized module's kind and
entry (`ditq.quant.modules`), the input groups, the recipe, `load_floats_as` (the dtype that floats a
default save narrowed losslessly to 16 bits load back in) and free `info`.
Tensors that the layers of one input group share are stored once, under `input_groups.<id>.<buffer>`.

Loading builds the skeleton on the meta device (or takes the caller's `model=` for models no adapter can
rebuild), swaps the quantized modules in and assigns the tensors read from the file, so no model-sized
tensor is allocated twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditq.adapters import adapter_for, get_adapter
from ditq.fileformat import CheckpointError, check_device, header_field, read_file, write_file
from ditq.fileformat import read_header as _read_header
from ditq.kernels.folding import folded_layers
from ditq.quant.fakequant import set_served_bits
from ditq.quant.modules import QUANT_MODULES, is_quantized, quant_module_entries, swap_in
from ditq.quant.qlinear import _FLOAT32_BUFFERS, INPUT_GROUP_BUFFERS, QuantLinear

__all__ = ["CheckpointError", "apply_served_bits", "float_storage", "load", "model_size_bytes", "read_header",
           "save", "served_bits_plan", "stored_tensors"]

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIDE_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # what a default save may narrow
GROUP_PREFIX = "input_groups."
ServedBits = int | Mapping[str, int] | str | os.PathLike


def save(model: nn.Module, path: str | os.PathLike, *, info: Mapping[str, Any] | None = None,
         float_dtype: torch.dtype | None = None) -> Path:
    """Write `model` to `path` atomically and return the path.

    Floats (all but the quantization format's own float32 buffers: scales, smoothing vectors, static
    activation scales) are stored in `float_dtype` and load back in it. By default (None) they are stored as
    small as they go without loss: when they share one dtype wider than 16 bits and every value is a float16
    value (else a bfloat16 one), in that 16-bit dtype, and they load back in their own dtype, bit-identical
    (a float32 model whose weights came from a 16-bit release takes half the bytes); otherwise as they are.
    `info` is free JSON data (provenance). Everything is checked before the file is written: the old file
    stays on any error. A model whose smoothing an FP8 backend folded into its layers' producers is refused: its
    producers no longer hold the weights it was quantized from (save before `prepare_for_inference`).
    """
    path = Path(path)
    folded = folded_layers(model)
    if folded:
        raise ValueError(f"cannot save a model whose smoothing was folded into the producers of {len(folded)} "
                         f"layer(s) ({folded[0]}, ...) by prepare_for_inference: save it before preparing it for an "
                         "FP8 backend, or prepare with fold=False")
    if float_dtype is not None and float_dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"float_dtype={float_dtype} is not one of {list(FLOAT_DTYPES)}")
    if info is not None and not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping of JSON data, got {type(info).__name__}")
    adapter = adapter_for(model)
    plan = _storage_plan(model, float_dtype)
    tensors, groups = plan.cast(), plan.groups
    header = {
        "model": {"arch": adapter.name, "config": adapter.config(model)},
        "modules": quant_module_entries(model),
        "input_groups": groups,
        "recipe": getattr(model, "ditq_recipe", None),
        "load_floats_as": None if plan.load_floats_as is None else _dtype_name(plan.load_floats_as),
        "info": dict(info or {}),
    }
    if header["model"]["config"] is not None:  # the file must rebuild what was saved, before it is written
        _check_fits(_skeleton(header, path, None), tensors, groups, path)
    return write_file(path, tensors, kind="checkpoint", header=header)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The verified header of a ditq checkpoint (tensors not read)."""
    return _read_header(path, kind="checkpoint")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, model: nn.Module | None = None,
         bits: ServedBits | None = None) -> nn.Module:
    """The model a checkpoint holds, in eval mode, bit-identical to the one saved.

    Zoo models are rebuilt from the header. For any other model pass `model=`, a full-precision instance
    of the same architecture (its weights are replaced); its Linears are swapped for the stored kinds.
    `bits` serves the nested layers (MatQuant: codes stored at more bits than served) at another slice:
    an int for all of them, or a mapping of layer-name patterns to bits (`{"blocks.0.*": 8, "*": 4}`, the
    first matching pattern wins; each must match a nested layer), or the path of a JSON file holding one.
    """
    device = check_device(device)
    path = Path(path)
    plan = None if bits is None else served_bits_plan(bits)
    tensors, header = read_file(path, kind="checkpoint")
    header, tensors = _upgrade(header, tensors, path)
    groups = header_field(path, header, "input_groups", dict)
    # the caller's model leaves as it came on any error: its modules and their tensor dicts, by reference
    originals = {} if model is None else {n: (m, dict(m._parameters), dict(m._buffers))
                                          for n, m in model.named_modules()}
    skeleton = _skeleton(header, path, model)
    try:
        if plan is not None:
            try:
                apply_served_bits(skeleton, plan)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        _check_fits(skeleton, tensors, groups, path)
        try:
            skeleton.load_state_dict(_widen_floats(skeleton, _expand_groups(tensors, groups), header, path),
                                     assign=True)
        except RuntimeError as err:
            reason = " ".join(str(err).split())  # torch's message spans lines
            raise CheckpointError(f"{path}: the tensors do not load into the model: {reason}") from err
        leftovers = [n for n, b in skeleton.named_buffers() if b.is_meta]
        if leftovers:
            raise CheckpointError(f"{path}: buffers {leftovers} are not stored in the checkpoint")
    except BaseException:
        for name, (module, params, buffers) in originals.items():
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            if name:
                skeleton.set_submodule(name, module)
        raise
    if header.get("recipe") is not None:
        skeleton.ditq_recipe = header["recipe"]
    skeleton = skeleton.to(device).eval()
    _share_group_tensors(skeleton, groups)  # `.to` copies each member's tensors apart
    return skeleton


def apply_served_bits(model: nn.Module, plan: Mapping[str, int]) -> None:
    """Serve `model`'s nested layers at a plan's widths: each layer at its first matching pattern's."""
    for pattern, width in reversed(plan.items()):  # earlier patterns applied last: the first match wins
        set_served_bits(model, width, pattern)


def served_bits_plan(bits: ServedBits) -> dict[str, int]:
    """`load`'s `bits` as an ordered mapping of layer-name pattern → served bits; a JSON file is read and the
    plan's form checked (the widths against each layer's stored bits when it is applied)."""
    if isinstance(bits, (str, os.PathLike)):
        source = Path(bits)
        try:
            plan = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"bits plan {source}: cannot be read as JSON ({err})") from err
        where = f"bits plan {source}"
    elif isinstance(bits, int) and not isinstance(bits, bool):
        plan, where = {"*": bits}, "bits"
    else:
        plan, where = bits, "bits"
    if not isinstance(plan, Mapping) or not plan:
        raise ValueError(f"{where} must be an int, a non-empty mapping of layer-name patterns to bits or a JSON "
                         f"file holding one, got {plan!r}")
    for pattern, width in plan.items():
        if not isinstance(pattern, str) or isinstance(width, bool) or not isinstance(width, int) \
                or not 2 <= width <= 8:
            raise ValueError(f"{where}: pattern {pattern!r} → {width!r}: bits must be an int in 2..8")
    return dict(plan)


def stored_tensors(model: nn.Module, float_dtype: torch.dtype | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(tensors as a checkpoint stores them, input group id → member names); shared tensors once."""
    plan = _storage_plan(model, float_dtype)
    return plan.cast(), plan.groups


def model_size_bytes(model: nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors `save(model, float_dtype=...)` writes (the header's few kB not counted).

    Counted from the storage plan, without casting just to measure it (the default `float_dtype=None` still
    checks, value by value, whether 16 bits hold the floats exactly)."""
    plan = _storage_plan(model, float_dtype)
    return sum(t.numel() * plan.dtypes[k].itemsize for k, t in plan.tensors.items())


def float_storage(model: nn.Module, float_dtype: torch.dtype | None = None) -> str:
    """How `save(model, float_dtype=...)` stores the model's floats, in words: "float16 (exact)",
    "float16 (rounded from float32)", "float32 (as in memory)"."""
    plan = _storage_plan(model, float_dtype)
    floats = {k: t for k, t in plan.tensors.items() if t.is_floating_point() and k not in plan.format_keys}
    stored = sorted({_dtype_name(plan.dtypes[k]) for k in floats})
    held = sorted({_dtype_name(t.dtype) for t in floats.values()})
    if stored == held:
        return f"{', '.join(stored) or 'none'} (as in memory)"
    exact = plan.load_floats_as is not None or all(_round_trips(t, plan.dtypes[k]) for k, t in floats.items())
    return f"{', '.join(stored)} ({'exact' if exact else 'rounded from ' + ', '.join(held)})"


# ---- internals -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoragePlan:
    """What `save` writes: uncast tensors by stored key, each key's stored dtype, the input groups, the keys
    of the format's own float buffers, and the dtype narrowed floats load back in (None: as stored)."""

    tensors: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]
    groups: dict[str, list[str]]
    format_keys: set[str]
    load_floats_as: torch.dtype | None

    def cast(self) -> dict[str, torch.Tensor]:
        """The tensors in their stored dtypes: what the file holds."""
        return {k: t.to(self.dtypes[k]) for k, t in self.tensors.items()}


def _storage_plan(model: nn.Module, float_dtype: torch.dtype | None) -> _StoragePlan:
    keep32 = _format_float_keys(model)
    tensors = {k: t.detach() for k, t in model.state_dict().items()}
    load_floats_as = None
    if float_dtype is None:
        floats = [t for k, t in tensors.items() if t.is_floating_point() and k not in keep32]
        float_dtype = _lossless_16bit(floats)
        load_floats_as = None if float_dtype is None else floats[0].dtype
    dtypes = {k: float_dtype if float_dtype is not None and t.is_floating_point() and k not in keep32 else t.dtype
              for k, t in tensors.items()}
    groups: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.spec.input_group is not None:
            groups.setdefault(m.spec.input_group, []).append(name)
    for gid, members in groups.items():
        for buffer in INPUT_GROUP_BUFFERS:
            keys = [f"{name}.{buffer}" for name in members if f"{name}.{buffer}" in tensors]
            if not keys:
                continue
            if len(keys) != len(members) or any(not torch.equal(tensors[keys[0]], tensors[k]) for k in keys):
                raise ValueError(f"input group {gid!r}: layers {members} must hold one equal {buffer!r} tensor")
            shared = f"{GROUP_PREFIX}{gid}.{buffer}"
            tensors[shared], dtypes[shared] = tensors[keys[0]], dtypes[keys[0]]
            for k in keys:
                del tensors[k], dtypes[k]
            if f"{members[0]}.{buffer}" in keep32:
                keep32.add(shared)
    return _StoragePlan(tensors, dtypes, groups, keep32, load_floats_as)


def _lossless_16bit(floats: list[torch.Tensor]) -> torch.dtype | None:
    """float16, else bfloat16, when the tensors share one dtype wider than 16 bits and every value survives
    the round trip through it; None otherwise. Stops at the first tensor that does not fit."""
    dtypes = {t.dtype for t in floats}
    if len(dtypes) != 1 or dtypes.pop().itemsize <= 2:
        return None
    for narrow in (torch.float16, torch.bfloat16):
        if all(_round_trips(t, narrow) for t in floats):
            return narrow
    return None


def _round_trips(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype or torch.equal(t.to(dtype).to(t.dtype), t)


def _widen_floats(model: nn.Module, tensors: dict[str, torch.Tensor], header: Mapping[str, Any], path: Path
                  ) -> dict[str, torch.Tensor]:
    """The floats a default `save` narrowed losslessly, back in the dtype they were saved from."""
    name = header.get("load_floats_as")
    if name is None:
        return tensors
    if name not in WIDE_FLOAT_DTYPES:
        raise CheckpointError(f"{path}: header field 'load_floats_as' must be one of {list(WIDE_FLOAT_DTYPES)} "
                              f"or null, got {name!r}")
    dtype = WIDE_FLOAT_DTYPES[name]
    keep = _format_float_keys(model)
    return {k: t.to(dtype) if t.is_floating_point() and k not in keep else t for k, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _format_float_keys(model: nn.Module) -> set[str]:
    kinds = tuple(QUANT_MODULES.values())
    return {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, kinds)
            for b in _FLOAT32_BUFFERS if getattr(m, b, None) is not None}


def _skeleton(header: Mapping[str, Any], path: Path, model: nn.Module | None) -> nn.Module:
    """The model to load into: rebuilt from the header on meta, or the caller's, with quant modules swapped in."""
    spec = header_field(path, header, "model", dict)
    arch = header_field(path, spec, "arch", str, "model")
    modules = header_field(path, header, "modules", dict)
    if model is None:
        config = spec.get("config")
        if config is None:
            raise CheckpointError(f"{path}: holds a {arch!r} model that ditq cannot rebuild by itself; "
                                  "build it and pass it as load(..., model=...)")
        header_field(path, spec, "config", dict, "model")
        try:
            adapter = get_adapter(arch)
            with torch.device("meta"):
                model = adapter.build(config)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: header field 'model' cannot be built: {err}") from err
    elif is_quantized(model):
        raise ValueError("model= must be a full-precision instance; it already holds quantized layers")
    try:
        with torch.device("meta"):
            swap_in(model, modules)
    except ValueError as err:
        raise CheckpointError(f"{path}: header field 'modules': {err}") from err
    return model


def _check_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], groups: Mapping[str, Any], path: Path
                ) -> None:
    """Every tensor the model expects is there with its shape, and nothing else is."""
    for gid, members in groups.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise CheckpointError(f"{path}: header field 'input_groups.{gid}' must list module names")
    expected = model.state_dict()
    have = _expand_groups(tensors, groups)
    missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    for key, ref in expected.items():
        if tuple(ref.shape) != tuple(have[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(have[key].shape)}, the model expects {tuple(ref.shape)}"
            )


def _expand_groups(tensors: Mapping[str, torch.Tensor], groups: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
    """Give every member of an input group the group's tensors (one tensor object, shared)."""
    out = {k: v for k, v in tensors.items() if not k.startswith(GROUP_PREFIX)}
    for key, t in tensors.items():
        if key.startswith(GROUP_PREFIX):
            gid, _, buffer = key[len(GROUP_PREFIX):].rpartition(".")
            for name in groups.get(gid, ()):
                out[f"{name}.{buffer}"] = t
    return out


def _share_group_tensors(model: nn.Module, groups: Mapping[str, list[str]]) -> None:
    """Give every member of an input group its lead's tensor objects for the buffers the group shares."""
    for members in groups.values():
        lead = model.get_submodule(members[0])
        for name in members[1:]:
            member = model.get_submodule(name)
            for buffer in INPUT_GROUP_BUFFERS:
                if getattr(lead, buffer, None) is not None:
                    member._buffers[buffer] = lead._buffers[buffer]


def _upgrade(header: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a v1 (ditq 0.1) checkpoint as v2: modules gain their kind, lora_* buffers their real names."""
    if header["format_version"] >= 2:
        return header, tensors
    modules = header_field(path, header, "modules", dict)
    header = {**header, "input_groups": {}, "modules": {}}
    v2_only = {"kind", "input_group", "stored_bits", "layout"}
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: header field 'modules.{name}' must be a mapping")
        spec = entry.get("spec") if isinstance(entry.get("spec"), dict) else {}
        if v2_only & (set(entry) | set(spec)):  # ditq 0.1 never wrote these: a relabelled (edited) v2 file
            raise CheckpointError(f"{path}: header field 'modules.{name}' has fields of format v2 in a v1 file")
        header["modules"][name] = {"kind": "quant_linear", **entry}
    renames = {".lora_down": ".lowrank_down", ".lora_up": ".lowrank_up"}
    renamed = {}
    for key, t in tensors.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        renamed[key] = t
    return header, renamed
