"""What produced an FP8 layer's input in a traced graph, when the input pre-pass can compute it instead.

Read on Dynamo's torch-level FX graph (`ditq.kernels.fusion`), whose nodes are torch functions and Tensor methods
with fake tensors for their values (`node.meta["example_value"]`). A producer is matched by its own nodes only,
whatever the model: a norm over the last dim (LayerNorm with or without affine, RMSNorm as `F.rms_norm` or as
diffusers writes it), then optionally adaLN's x·(1 + scale) + shift with one row per sample, with the residual
add before the norm; or an activation (GELU, SiLU); or an attention's output; or a concatenation of two parts
along the last dim, the second optionally through an activation (FLUX's single blocks: cat([attention,
GELU(mlp)])); or, with no norm after it, a residual add whose sum other ops read too (PixArt's cross-attention
query); or an input of the graph itself. A producer's input that concatenates two parts' tokens is read part by
part (FLUX's single blocks normalize cat([text, image])). What the op cannot apply (its signature says which norms
it takes) is not matched.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ditq.kernels import fp8  # noqa: F401  (defines the op ditq::quantize_rows_fp8)
from ditq.kernels.reference import INPUT_ACTIVATIONS

__all__ = ["Producer", "is_method", "producer_of", "shape", "value"]

# whether the pre-pass takes a `norm` other than adaLN's (LayerNorm without affine under a modulate): LayerNorm
# with affine, RMSNorm, a norm without a modulate, and the residual add without a gate that comes with them
_OTHER_NORMS = "norm" in {a.name for a in torch.ops.ditq.quantize_rows_fp8.default._schema.arguments}
_ADD = (operator.add, torch.add)
# the ops of an FP8 layer's input (`ditq.kernels.fp8`): a reader of a sum that is one of them is a quantized layer
_INPUT_OPS = tuple(target for op in (torch.ops.ditq.fp8_input_codes.default, torch.ops.ditq.quantize_rows_fp8.default)
                   for target in (op, op.overloadpacket))  # fmt: skip
_MUL = (operator.mul, torch.mul)
_VIEWS = {"reshape", "view", "transpose", "permute", "flatten", "unflatten", "contiguous"}
# the producers' signatures (torch's builtins have none; Dynamo records nn.RMSNorm as torch.rms_norm)
_RMS_NORM = inspect.signature(lambda input, normalized_shape, weight=None, eps=None: None)
_SIGNATURES = {
    F.layer_norm: inspect.signature(F.layer_norm),
    torch.layer_norm: inspect.signature(lambda input, normalized_shape, weight=None, bias=None, eps=1e-5,
                                        cudnn_enable=True: None),  # fmt: skip
    F.rms_norm: _RMS_NORM,
    torch.rms_norm: _RMS_NORM,
    F.dropout: inspect.signature(F.dropout),
    F.gelu: inspect.signature(lambda input, approximate="none": None),
    F.silu: inspect.signature(F.silu),
}


@dataclass(frozen=True)
class Producer:
    """What the pre-pass computes instead of x's producer: `activation`(`x`), or [modulate(] norm(x) [, shift,
    scale)] with `shift` and `scale` one row per sample, after x = `x` + [`gate`·]`update` when `residual` (the
    add, whose readers then read the pre-pass's sum) is not None. `norm` None under a shift: LayerNorm without
    affine, the op's default."""

    kind: str  # what counts it: "norm_modulate", "norm", "gelu", "silu", "attention", "concat", "sum" or "input"
    x: fx.Node
    activation: str = "none"
    norm: str | None = None
    eps: float = 0.0
    norm_weight: fx.Node | None = None
    norm_bias: fx.Node | None = None
    shift: fx.Node | None = None
    scale: fx.Node | None = None
    residual: fx.Node | None = None
    update: fx.Node | None = None
    gate: fx.Node | None = None
    second: fx.Node | None = None  # the input's second part: its channels behind x's (through `activation`) or,
    first_tokens: int = 0  # when this (T₁) is > 0, its tokens behind x's (N, T₁, K) in each sample


def producer_of(x: fx.Node) -> Producer | None:
    """The producer of a layer's input x that the pre-pass can compute, or None."""
    source = _through_identities(x)
    found = (_modulated(source) or _normalized_alone(source) or _activation(source) or _concatenated(source)
             or _attention_output(x) or _summed(source) or _graph_input(x))  # fmt: skip
    return found if found is None else _tokens_apart(found)


def _tokens_apart(p: Producer) -> Producer:
    """p reading the two parts of its input where that input is cat([a, b], 1) of (N, T, K) tensors (FLUX's single
    blocks normalize cat([text, image]) tokens), so that the concatenation is not written first; with a residual
    (whose sum the pre-pass writes) or on its own input p stays."""
    parts = _token_parts(p.x) if p.residual is None and p.second is None and p.kind != "attention" else None
    if parts is None:
        return p
    first, second = parts
    return dataclasses.replace(p, x=first, second=second, first_tokens=shape(first)[1])


def _token_parts(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(a, b) where node = cat([a, b], dim=1) of two (N, T, K) tensors of one float dtype."""
    parts, dim = _cat_operands(node)
    if parts is None or len(shape(parts[0])) != 3 or dim not in (1, -2):
        return None
    a, b = parts
    same = shape(a)[0] == shape(b)[0] and shape(a)[2] == shape(b)[2] and min(shape(a)[1], shape(b)[1]) > 0
    return (a, b) if same and _float(a) and _same_dtype(a, b) else None


def _cat_operands(node: fx.Node) -> tuple[tuple[fx.Node, fx.Node] | None, Any]:
    """((first, second), dim) when node concatenates two tensors, else (None, None)."""
    if not (node.op == "call_function" and node.target in (torch.cat, torch.concat)):
        return None, None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and all(isinstance(p, fx.Node) for p in parts)):
        return None, None
    return tuple(parts), dim


def _modulated(node: fx.Node) -> Producer | None:
    """x·(1 + scale) + shift of a norm's output with per-sample (N, 1, K) shift and scale, x (N, T, K)."""
    for product, shift in _operands(node, _ADD):
        for normed, gain in _operands(product, _MUL):
            norm, scale = _normalized(normed), _added_to_one(gain)
            if norm is None or scale is None:
                continue
            x = norm["x"]
            if not _per_sample(x, shift, gain) or value(scale).numel() != shape(x)[0] * shape(x)[2]:
                continue
            if not _same_dtype(x, scale, node):
                continue
            if norm["norm"] == "layer" and norm["norm_weight"] is None and norm["norm_bias"] is None:
                norm["norm"] = None  # adaLN's LayerNorm: the op's default under a shift
            if norm["norm"] is not None and not _OTHER_NORMS:
                continue
            return Producer("norm_modulate", **(norm | dict(shift=shift, scale=scale) | _residual(x, modulated=True)))
    return None


def _normalized_alone(node: fx.Node) -> Producer | None:
    norm = _normalized(node) if _OTHER_NORMS else None
    if norm is None or not _same_dtype(norm["x"], node):
        return None
    return Producer("norm", **(norm | _residual(norm["x"], modulated=False)))


def _summed(node: fx.Node) -> Producer | None:
    """A residual add read as it is, x + gate·update with a per-sample gate or x + update, whose sum other ops read
    too (PixArt's cross-attention query is the block's residual stream): the pre-pass writes the sum beside the
    codes. A sum only the layers read is left to inductor, which quantizes it without writing it."""
    found = _residual(node, modulated=True)
    readers = [u for u in node.users if not (u.op == "call_function" and u.target in _INPUT_OPS)]
    return Producer("sum", **found) if found and readers else None


def _residual(node: fx.Node, modulated: bool) -> dict[str, fx.Node]:
    """{residual, x, update, gate} when the norm's input `node` is x + gate·update with a per-sample gate (read per
    sample of the modulation's rows: only under one) or, where the op takes it, x + update; else {}."""
    for x, product in _operands(node, _ADD):
        for gate, update in _operands(product, _MUL):
            if modulated and shape(update) == shape(x) and _per_sample(x, gate) and _same_dtype(x, update):
                return dict(residual=node, x=x, update=update, gate=gate)
    for x, update in _operands(node, _ADD):
        if _OTHER_NORMS and shape(update) == shape(x) and _float(x) and _same_dtype(x, update, node):
            return dict(residual=node, x=x, update=update)
    return {}


def _normalized(node: Any) -> dict[str, Any] | None:
    """{x, norm, eps, norm_weight, norm_bias} when node normalizes x over its last dim, in x's dtype."""
    layer, rms = _bound(node, F.layer_norm, torch.layer_norm), _bound(node, F.rms_norm, torch.rms_norm)
    bound = layer or rms
    if bound is not None:
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        eps = bound["eps"] if bound["eps"] is not None else torch.finfo(value(x).dtype).eps if _float(x) else 0.0
        norm = dict(x=x, norm="layer" if layer else "rms", eps=float(eps), norm_weight=weight, norm_bias=bias)
        over_k = tuple(bound["normalized_shape"]) == shape(x)[-1:]
    else:
        norm = _rms_as_ops(node)
        over_k = norm is not None
    if norm is None or not over_k or not _float(norm["x"]):
        return None
    affine = [t for t in (norm["norm_weight"], norm["norm_bias"]) if t is not None]
    if not all(shape(t) == shape(norm["x"])[-1:] for t in affine) or not _same_dtype(norm["x"], *affine):
        return None
    return norm


def _rms_as_ops(node: Any) -> dict[str, Any] | None:
    """diffusers' RMSNorm: h = x · rsqrt(mean(x_f32², -1) + eps), cast to x's dtype, then [· weight [+ bias]]."""
    weight = bias = None
    for h, b in _operands(node, _ADD):
        if _is_vector_of(b, h):
            node, bias = h, b
            break
    for h, w in _operands(node, _MUL):
        if _is_vector_of(w, h):
            node, weight = h, w
            break
    scaled = _rsqrt_scaled(_cast_source(node))
    if scaled is None or bias is not None and weight is None:
        return None
    x, eps = scaled
    return dict(x=x, norm="rms_cast", eps=eps, norm_weight=weight, norm_bias=bias)


def _rsqrt_scaled(node: Any) -> tuple[fx.Node, float] | None:
    """(x, eps) when node = x · rsqrt(mean(x.to(float32).pow(2), -1, keepdim=True) + eps)."""
    for x, r in _operands(node, _MUL):
        root = r.args[0] if r.op == "call_function" and r.target is torch.rsqrt and len(r.args) == 1 else None
        if not (isinstance(root, fx.Node) and root.op == "call_function" and root.target in _ADD):
            continue
        mean, eps = root.args
        if not (is_method(mean, {"mean"}) and mean.args[1:] == (-1,) and mean.kwargs == {"keepdim": True}):
            continue
        square = mean.args[0]
        if is_method(square, {"pow"}) and square.args[1:] == (2,) and _cast_source(square.args[0]) is x:
            return (x, float(eps)) if isinstance(eps, (int, float)) else None
    return None


def _activation(node: fx.Node) -> Producer | None:
    """GELU (exact or tanh) or SiLU (not in place), where the pre-pass has it."""
    gelu, silu = _bound(node, F.gelu), _bound(node, F.silu)
    if gelu is not None:
        kind, name, x = "gelu", {"none": "gelu", "tanh": "gelu_tanh"}.get(gelu["approximate"]), gelu["input"]
    elif silu is not None and not silu["inplace"]:
        kind, name, x = "silu", "silu", silu["input"]
    else:
        return None
    return Producer(kind, x, activation=name) if name in INPUT_ACTIVATIONS and _float(x) else None


def _concatenated(node: fx.Node) -> Producer | None:
    """cat([x, second], -1) of two parts of one float dtype and one leading shape, `second` seen through its
    activation where it has one the pre-pass applies."""
    parts, dim = _cat_operands(node)
    if parts is None:
        return None
    x, second = parts
    if dim not in (-1, len(shape(x)) - 1) or shape(x)[:-1] != shape(second)[:-1] or not _float(x):
        return None
    if not _same_dtype(x, second, node):
        return None
    activated = _activation(_through_identities(second))
    if activated is not None and _same_dtype(x, activated.x):
        return Producer("concat", x, activation=activated.activation, second=activated.x)
    return Producer("concat", x, second=second)


def _attention_output(node: fx.Node) -> Producer | None:
    """x itself, when it is an attention's output seen through reshapes and slices (a joint attention's text or
    image tokens), and x's rows are contiguous (a slice of the rows of several samples would cost a copy
    first; one sample's tokens are contiguous rows)."""
    source = node
    while True:
        whole = _sliced(source)
        if whole is not None:
            if not value(source).is_contiguous():
                return None  # the rows of several samples: a copy (`.contiguous()`) would be written for the pre-pass
            source = whole
        elif is_method(source, _VIEWS) or _same_dtype_cast(source):
            source = source.args[0]
        else:
            break
    attention = source.op == "call_function" and source.target is F.scaled_dot_product_attention
    return Producer("attention", node) if attention and _float(node) and value(node).is_contiguous() else None


def _graph_input(node: fx.Node) -> Producer | None:
    """x itself, when it is one of the graph's inputs (seen through reshapes) with contiguous rows: no producer in
    the graph for inductor to fuse its quantization into, so one read by the pre-pass beats inductor's absmax and
    cast kernels (PixArt's cross-attention keys and values read the caption, an input of every block)."""
    source = node
    while is_method(source, {"reshape", "view"}) or _same_dtype_cast(source):
        source = source.args[0]
    contiguous = _float(node) and value(node).is_contiguous()
    return Producer("input", node) if source.op == "placeholder" and contiguous else None


def _sliced(node: fx.Node) -> fx.Node | None:
    """t where node is a part of t: `t[:, a:b]` (slices alone) or a piece of `t.split(...)` / `split_with_sizes`."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return None
    base, index = node.args
    if isinstance(index, int) and is_method(base, {"split", "split_with_sizes"}):
        return base.args[0]
    slices = index if isinstance(index, tuple) else (index,)
    return base if all(isinstance(i, slice) for i in slices) else None


# ---- reading the graph ------------------------------------------------------------------------------------


def value(node: Any) -> torch.Tensor | None:
    """A node's fake tensor (None for constants and tuples)."""
    fake = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return fake if isinstance(fake, torch.Tensor) else None



def shape(node: Any) -> tuple[int, ...]:
    fake = value(node)
    return () if fake is None else tuple(fake.shape)



def is_method(node: Any, names: set[str]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names



def _float(node: Any) -> bool:
    fake = value(node)
    return fake is not None and fake.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _per_sample(x: fx.Node, *rows: fx.Node) -> bool:
    """Whether x is (N, T, K) in a pre-pass dtype and each of `rows` (N, 1, K) in x's dtype."""
    x_shape = shape(x)
    if len(x_shape) != 3 or not _float(x):
        return False
    return all(shape(n) == (x_shape[0], 1, x_shape[2]) for n in rows) and _same_dtype(x, *rows)


def _same_dtype(x: fx.Node, *others: fx.Node) -> bool:
    return all(value(n) is not None and value(n).dtype == value(x).dtype for n in others)


def _is_vector_of(node: Any, x: Any) -> bool:
    """Whether node is a (K,) tensor for x (..., K)."""
    return isinstance(node, fx.Node) and len(shape(node)) == 1 and shape(node) == shape(x)[-1:]


def _operands(node: Any, targets: tuple) -> Iterator[tuple[fx.Node, fx.Node]]:
    """Both orders of a binary add or mul's two tensor operands (none for anything else)."""
    binary = isinstance(node, fx.Node) and len(node.args) == 2 and not node.kwargs and (
        node.op == "call_function" and node.target in targets
        or node.op == "call_method" and node.target == targets[0].__name__)  # fmt: skip
    if binary and all(isinstance(a, fx.Node) for a in node.args):
        a, b = node.args
        yield a, b
        yield b, a


def _added_to_one(node: Any) -> fx.Node | None:
    """s where node = 1 + s or s + 1, seen through unsqueezes (`(1 + scale)[:, None]`)."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in _ADD and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            s = b if a == 1 else a if b == 1 else None
            return s if value(s) is not None else None
        if not _unsqueezed(node):
            return None
        node = node.args[0]
    return None


def _unsqueezed(node: fx.Node) -> bool:
    """Whether node only adds unit dims to its input: unsqueeze, or indexing with full slices and None."""
    if is_method(node, {"unsqueeze"}) or node.op == "call_function" and node.target is torch.unsqueeze:
        return True
    index = node.args[1] if node.op == "call_function" and node.target is operator.getitem else 0
    index = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None) for i in index) and None in index


def _through_identities(node: fx.Node) -> fx.Node:
    """node's input while node is an identity at inference: dropout outside training, a cast to its own dtype."""
    while True:
        dropout = _bound(node, F.dropout)
        if dropout is not None and (not dropout["training"] or dropout["p"] == 0):
            node = dropout["input"]
        elif _same_dtype_cast(node):
            node = node.args[0]
        else:
            return node


def _cast_source(node: Any) -> Any:
    """x where node = x.to(dtype) (any dtype), else node."""
    return node.args[0] if is_method(node, {"to"}) and len(node.args) == 2 and not node.kwargs else node


def _same_dtype_cast(node: fx.Node) -> bool:
    return is_method(node, {"to"}) and value(node) is not None and value(node.args[0]) is not None and (
        value(node).dtype == value(node.args[0]).dtype)  # fmt: skip


def _bound(node: Any, *fns: Callable) -> dict[str, Any] | None:
    """node's arguments by name with defaults, if it calls one of `fns`."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in fns):
        return None
    bound = _SIGNATURES[node.target].bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return bound.arguments
