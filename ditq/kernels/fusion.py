"""A `torch.compile` graph pass that folds what produces an FP8 layer's input into that layer's input pre-pass.

An FP8 layer quantizes its input per token: the row absmax, then the e4m3 cast. Inductor fuses that into the
kernel of x's producer, but badly where the producer is itself a row reduction or costly per element
(`ditq.kernels.triton.rowquant` says why and what it costs). The Triton pre-pass `ditq::quantize_rows_fp8` reads
each row once and applies the producer itself. This pass finds, on any traced model, every FP8 layer's input
(the op `ditq::fp8_input_codes`, or a pre-pass call of a layer with a low-rank branch) and, where x comes from
one of these (`ditq.kernels.producers` matches them), moves the producer into the pre-pass:
- a norm (LayerNorm, RMSNorm), then adaLN's modulate x·(1 + scale) + shift with shift and scale one row per
  sample ((N, 1, K) against x (N, T, K), in any spelling: `unsqueeze(1)`, `[:, None]`, a chunk), or no modulate;
- before that norm, a residual add x' = x + gate·update (gate per sample, under a modulate) or x + update: the
  pre-pass writes x' beside the codes, and every later reader of x' reads that; so too without a norm, where a
  layer reads the sum as it is and other ops read it after (PixArt's cross-attention query is the block's
  residual stream, x + gate·attention);
- GELU (exact or tanh) or SiLU, as the pre-pass's activation;
- an attention output (reshapes of `scaled_dot_product_attention`'s result, or one sample's text or image tokens
  of a joint attention's, contiguous rows): nothing to fold, but one read by the
  pre-pass beats inductor's absmax and cast kernels (DiT-XL/2 W4A8-FP8 at batch 64 on an H200: 1.35× bf16
  against 1.30×, `bench/results/e2e_fp8_v12_models_h200.md`); so too an input of the graph, which has no
  producer there for inductor to fuse into (a block compiled alone: PixArt's caption, read by every
  cross-attention's keys and values);
- a concatenation along the last dim, its second part optionally through GELU or SiLU: FLUX's single blocks feed
  their out projection cat([attention, GELU(mlp)]) (4,608 × 15,360), which inductor quantizes in two kernels, the
  GELU recomputed (287 µs per block on an H100, `bench/results/diffusers_flux_profile_h100_*.txt`); the pre-pass
  reads both parts once;
- under any of these, a concatenation of tokens, cat([a, b], 1) of (N, T, K) tensors without a residual add to
  fold (FLUX's single blocks normalize cat([text, image]), which inductor wrote first: 66 µs per block on the
  H100): the pre-pass reads each sample's rows from both.
Any other input is left alone: `ditq::fp8_input_codes` then decomposes into ordinary ops that inductor fuses
into the producer. Identical pre-passes (q, k and v reading one x with the same smoothing) run once, and the GEMMs
of layers whose weights were joined (`ditq.kernels.joined`: calls `ditq::fp8_gemm_rows` over rows of one weight)
that read those codes become one GEMM over their rows, each layer reading its columns of the output.

It is a pre-grad pass (`torch._inductor.config.pre_grad_custom_pass`) on Dynamo's torch-level graph, where a
LayerNorm or a GELU is one node with fake tensors for shapes. Later, a `triton_op` (the pre-pass on GPUs) is
decomposed into its kernels during AOT tracing and LayerNorm into its statistics, so a post-grad pass would
see neither. `install_fusion_pass` (called by `prepare_for_inference` for the FP8 backends) chains it after a
pass already installed; graphs without ditq's FP8 ops are left untouched. Eager models run the plain ops.
"""

from __future__ import annotations

import operator
from itertools import pairwise
from typing import Any

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ditq.kernels import producers
from ditq.kernels.fp8 import fp8_input_codes
from ditq.kernels.producers import Producer, is_method, producer_of, shape

__all__ = ["COUNTER", "FusionPass", "fold_fp8_inputs", "install_fusion_pass"]

COUNTER = "ditq_fusion"  # `torch._dynamo.utils.counters[COUNTER][kind]`: what the pass folded, by kind
PRE_PASS = torch.ops.ditq.quantize_rows_fp8.default  # defined with `fp8_input_codes` by `ditq.kernels.fp8`
GEMM_ROWS = torch.ops.ditq.fp8_gemm_rows.default
_GEMM_ARGS = tuple(a.name for a in GEMM_ROWS._schema.arguments)
_MARKERS = (fp8_input_codes, fp8_input_codes.overloadpacket)
_PRE_PASSES = (PRE_PASS, PRE_PASS.overloadpacket)
_PRE_PASS_ARGS = tuple(a.name for a in PRE_PASS._schema.arguments)
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
# ops whose output views their input, as a graph calls them: a strided input may leave them no view to take
_VIEW_METHODS = {"view", "reshape", "unflatten", "flatten", "transpose", "permute", "unsqueeze", "squeeze", "t",
                 "expand", "split", "chunk", "unbind"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.flatten, torch.unflatten, torch.transpose, torch.permute,
                   torch.unsqueeze, torch.squeeze, torch.split, torch.chunk, torch.unbind}


class FusionPass(CustomGraphPass):
    """`fold_fp8_inputs` after `previous` (the pre-grad pass installed before, or None)."""

    def __init__(self, previous: Any = None):
        self.previous = previous

    def __call__(self, graph: fx.Graph) -> None:
        for custom_pass in _passes(self.previous):
            custom_pass(graph)
        fold_fp8_inputs(graph)

    def uuid(self) -> Any:
        """The pass's source and the op's signature (what it can fold), with the chained passes' ids; None (no
        caching) when one of them has none."""
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in _passes(self.previous)]
        own = get_hash_for_files((__file__, producers.__file__), str(PRE_PASS._schema))
        return None if None in ids else (own, *ids)


def install_fusion_pass() -> None:
    """Make every later `torch.compile` fold FP8 layers' producers (once; a pass already there runs first)."""
    current = inductor_config.pre_grad_custom_pass
    if not any(isinstance(p, FusionPass) for p in _passes(current)):
        inductor_config.pre_grad_custom_pass = FusionPass(current)


def _passes(custom: Any) -> tuple:
    return () if custom is None else tuple(custom) if isinstance(custom, (list, tuple)) else (custom,)


# ---- the rewrite ------------------------------------------------------------------------------------------


def fold_fp8_inputs(graph: fx.Graph) -> None:
    """Replace each FP8 layer input in `graph` by a pre-pass call with its producer folded in; dedupe equal
    ones. Counts go to `counters[COUNTER]`."""
    inputs = [n for n in graph.nodes if n.op == "call_function" and n.target in _MARKERS + _PRE_PASSES]
    if not inputs:
        return
    rewrite = _Rewrite(graph)
    for node in inputs:
        rewrite.fold(node)
    rewrite.finish()
    _join_gemms(graph)


def _join_gemms(graph: fx.Graph) -> None:
    """One GEMM for the calls of `ditq::fp8_gemm_rows` that read the same codes and adjacent rows of one weight;
    each call becomes its columns of that GEMM's output."""
    calls: dict[tuple, dict[fx.Node, dict[str, Any]]] = {}  # key → each call's arguments, in graph order
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (GEMM_ROWS, GEMM_ROWS.overloadpacket):
            args = _gemm_args(node)
            if isinstance(args["start"], int) and isinstance(args["stop"], int):
                key = tuple(_operand(args[n]) if n in ("codes", "scale_x") else args[n]
                            for n in _GEMM_ARGS if n not in ("start", "stop"))  # fmt: skip
                calls.setdefault(key, {})[node] = args
    for group in calls.values():
        spans = sorted({(args["start"], args["stop"]) for args in group.values()})
        if len(spans) < 2 or any(a[1] != b[0] for a, b in pairwise(spans)):
            continue  # one layer's rows, or rows with a gap (a layer of the group reads another input)
        first, start = next(iter(group)), spans[0][0]
        joined_args = tuple((group[first] | dict(start=start, stop=spans[-1][1]))[n] for n in _GEMM_ARGS)
        joined_value = _fake_value("call_function", GEMM_ROWS, joined_args)
        columns = {node: (slice(None), slice(args["start"] - start, args["stop"] - start))
                   for node, args in group.items()}  # fmt: skip
        if not all(_readers_take(node, _fake_value("call_function", operator.getitem, (joined_value, index)))
                   for node, index in columns.items()):  # fmt: skip
            continue
        with graph.inserting_before(first):
            joined = _new_node(graph, GEMM_ROWS, joined_args)
        for node, index in columns.items():
            with graph.inserting_before(node):
                node.replace_all_uses_with(_new_node(graph, operator.getitem, (joined, index)))
            graph.erase_node(node)
        counters[COUNTER]["joined_gemm"] += len(group)


def _readers_take(node: fx.Node, value: torch.Tensor) -> bool:
    """Whether `node`'s readers take `value` in its place: its columns of a joined output, rows strided by the
    whole output's width where the call's own output was contiguous. Ops that compute take any strides; a view
    (followed through the views after it) must still be possible, and a graph output would hand the strides to the
    caller."""
    for user in node.users:
        if user.op == "output":
            return False
        if is_method(user, _VIEW_METHODS) or user.op == "call_function" and user.target in _VIEW_FUNCTIONS:
            args = tuple(value if a is node else a for a in user.args)
            try:
                viewed = _fake_value(user.op, user.target, args, user.kwargs)
            except (RuntimeError, ValueError):  # the view needs the strides the call had
                return False
            if not _readers_take(user, viewed):
                return False
    return True


def _gemm_args(node: fx.Node) -> dict[str, Any]:
    return dict(zip(_GEMM_ARGS, node.args, strict=False)) | node.kwargs


def _operand(node: Any) -> Any:
    """Equal for two reads of one value: a getitem of the same node and index (each layer unpacks its codes)."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        return ("getitem", *node.args)
    return node


def _new_node(graph: fx.Graph, target: Any, args: tuple) -> fx.Node:
    node = graph.call_function(target, args)
    node.meta["example_value"] = _fake_value("call_function", target, args)
    return node


class _Rewrite:
    """One run of the pass over a graph: the nodes it made (each once) and the inputs it replaced."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.made: dict[tuple, fx.Node] = {}  # an input's or a new node's key → the node computing it
        self.dropped: list[fx.Node] = []  # nodes that may have lost their last user

    def fold(self, node: fx.Node) -> None:
        args = _pre_pass_args(node)
        key = _key(node.target, args)
        if key in self.made:  # the same input quantized the same way earlier
            self._replace(node, self.made[key], "deduped")
            return
        producer = _foldable(node, args)
        if producer is None:
            self.made[key] = node
            counters[COUNTER]["plain"] += node.target in _MARKERS
            return
        with self.graph.inserting_before(node):
            fused = self._pre_pass(args, producer)
        self.made[key] = fused
        self._replace(node, fused, producer.kind)
        counters[COUNTER]["token_concat"] += producer.first_tokens > 0
        if producer.residual is not None:
            counters[COUNTER]["residual"] += 1
            with self.graph.inserting_after(fused):
                x_new = self._call("call_function", operator.getitem, (fused, 2))
                x_new = self._call("call_method", "view", (x_new, *shape(producer.residual)))
            producer.residual.replace_all_uses_with(x_new)
            self.dropped.append(producer.residual)

    def _pre_pass(self, args: dict[str, Any], p: Producer) -> fx.Node:
        k = shape(p.x)[-1]
        args = args | dict(x=self._rows(p.x, -1, k), activation=p.activation)
        if p.shift is not None:  # (N, T, K) rows of N samples
            n, tokens = shape(p.x)[:2]
            tokens += shape(p.second)[1] if p.first_tokens else 0
            args |= dict(shift=self._rows(p.shift, n, k), scale=self._rows(p.scale, n, k), tokens=tokens, eps=p.eps)
        if p.norm is not None:  # another norm than the op's default (only where the op takes one)
            args |= dict(norm=p.norm, norm_weight=p.norm_weight, norm_bias=p.norm_bias, eps=p.eps)
        if p.residual is not None:
            gate = None if p.gate is None else self._rows(p.gate, shape(p.x)[0], k)
            args |= dict(update=self._rows(p.update, -1, k), gate=gate)
            if p.gate is not None and p.shift is None:  # a gate's rows per sample, without a modulation's
                args |= dict(tokens=shape(p.x)[1])
        if p.second is not None:
            args |= dict(second=self._rows(p.second, -1, shape(p.second)[-1]), first_tokens=p.first_tokens)
        return self._call("call_function", PRE_PASS, tuple(args[name] for name in _PRE_PASS_ARGS))

    def _rows(self, node: fx.Node, rows: int, k: int) -> fx.Node:
        return self._call("call_method", "reshape", (node, rows, k))

    def _call(self, op: str, target: Any, args: tuple) -> fx.Node:
        """A node of the graph computing target(*args), made once per run, with its fake value."""
        key = (op, target, args)
        if key not in self.made:
            node = self.graph.create_node(op, target, args)
            node.meta["example_value"] = _fake_value(op, target, args)
            self.made[key] = node
        return self.made[key]

    def _replace(self, node: fx.Node, by: fx.Node, kind: str) -> None:
        node.replace_all_uses_with(by)
        self.dropped.append(node)
        counters[COUNTER][kind] += 1

    def finish(self) -> None:
        """Erase what lost its users (the folded producers), then restore a topological order: a later reader of a
        residual sum now reads the pre-pass's output."""
        pending, erased = list(self.dropped), set()
        while pending:
            node = pending.pop()
            if node in erased or node.op not in ("call_function", "call_method") or node.users or node.is_impure():
                continue
            pending.extend(node.all_input_nodes)
            self.graph.erase_node(node)
            erased.add(node)
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(self.graph)


def _pre_pass_args(node: fx.Node) -> dict[str, Any]:
    """The pre-pass's arguments by name for a marker (x, inv_smooth) or a pre-pass call."""
    defaults = {a.name: a.default_value for a in PRE_PASS._schema.arguments}
    if node.target in _MARKERS:
        return defaults | dict(x=node.args[0], inv_smooth=node.args[1], activation="none")
    return defaults | dict(zip(_PRE_PASS_ARGS, node.args, strict=False)) | node.kwargs  # defaults may be left out


def _foldable(node: fx.Node, args: dict[str, Any]) -> Producer | None:
    """The producer to fold into this input, if any: a marker's x (N, T, K) or (M, K), or the 2-D x of a pre-pass
    call that folds nothing yet (a low-rank layer's)."""
    x = args["x"]
    if node.target in _PRE_PASSES:
        if args["activation"] != "none" or any(args.get(a) is not None for a in ("shift", "update", "norm", "second")):
            return None
        x = x.args[0] if is_method(x, {"reshape", "view"}) else x
    producer = producer_of(x) if isinstance(x, fx.Node) else None
    if producer is None or producer.kind in ("attention", "input") and node.target in _PRE_PASSES:
        return None
    cycle = producer.residual is not None and any(
        _depends_on(n, producer.residual) for n in (producer.shift, producer.scale, args["inv_smooth"]))
    return None if cycle or _mutated(producer, x) else producer


def _key(target: Any, args: dict[str, Any]) -> tuple:
    """Equal for two calls computing the same codes: x up to a reshape of the same node."""
    x = args["x"]
    if is_method(x, {"reshape", "view"}):
        x = ("reshape", x.args[0], shape(x))
    return (target in _MARKERS, x, *(args[n] for n in _PRE_PASS_ARGS[1:]))


# ---- graph reading ---------------------------------------------------------------------------------------


def _depends_on(node: Any, ancestor: fx.Node) -> bool:
    """Whether `ancestor` is among the nodes `node` is computed from."""
    seen, pending = set(), [node] if isinstance(node, fx.Node) else []
    while pending:
        current = pending.pop()
        if current is ancestor:
            return True
        if current not in seen:
            seen.add(current)
            pending.extend(current.all_input_nodes)
    return False


def _mutated(p: Producer, x: fx.Node) -> bool:
    """Whether a node the pre-pass would read, or one it would compute instead (from x back to those it reads: a
    norm's output, a concatenation), is written in place somewhere (the pre-grad graph is not functional): moving
    the read, or skipping the node, could then see another value."""
    operands = {n for n in (p.x, p.shift, p.scale, p.update, p.gate, p.norm_weight, p.norm_bias, p.second)
                if n is not None}  # fmt: skip
    computed, pending = set(), [x]
    while pending:
        node = pending.pop()
        if node not in computed and node not in operands:
            computed.add(node)
            pending.extend(node.all_input_nodes)
    return any(
        user.op == "call_function" and user.target in _IN_PLACE
        or user.op == "call_method" and str(user.target).endswith("_")
        for node in operands | computed for user in node.users
    )  # fmt: skip


def _fake_value(op: str, target: Any, args: tuple, kwargs: dict | None = None) -> Any:
    """target(*args, **kwargs) on the args' fake tensors (nodes' values, or fake tensors given), as Dynamo records
    node values."""
    fakes, kwargs = torch.utils._pytree.tree_map(
        lambda a: a.meta["example_value"] if isinstance(a, fx.Node) else a, (list(args), kwargs or {}))
    leaves = torch.utils._pytree.tree_leaves(fakes)
    with next(f.fake_mode for f in leaves if isinstance(f, torch.Tensor)):  # Dynamo's, not the compiler's
        if op == "call_method":
            return getattr(fakes[0], target)(*fakes[1:], **kwargs)
        if target is operator.getitem:
            return fakes[0][fakes[1]]
        return target(*fakes, **kwargs)
