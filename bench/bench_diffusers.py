"""Per-step time and memory of diffusers transformers at the sizes people run, bf16 vs torchao's float8 vs ditq.

Random weights in bf16 at 1024 px: a FLUX.1-dev-size FluxTransformer2DModel (19 double + 38 single blocks, hidden
3072; 4,096 image + 512 text tokens), an SD3-medium SD3Transformer2DModel (24 joint blocks, hidden 1536; 4,096 +
333 tokens) and a PixArt-Σ XL PixArtTransformer2DModel (28 blocks, hidden 1152; 4,096 tokens, 300 of text).
For each model and batch, every config is rebuilt from the same seed and run on the same inputs: `bf16` (first:
the baseline of the ratios and the output error), `torchao-fp8-row` (torchao's float8 dynamic row-wise, the peer,
on the Linears ditq quantizes: the adapter's default skip) and `RECIPE@BACKEND` (a ditq recipe, prepared for a
kernel backend), on an FP8 backend with `+fast-accum` or `+exact-accum` to set cuBLAS's fast accumulation
(without either, the backend's default: on), with `+static-launch` compiled with inductor launching ditq's
Triton kernels (user-defined kernels to it) through its static launcher, as it launches its own (less host time
per launch; off by default in torch), and with `+unjoined` prepared with `join=False` (q, k and v as three GEMMs).

Compiled with torch.compile block by block (each block of the transformer's ModuleLists, as diffusers'
`compile_repeated_blocks` does; `--whole-graph` compiles the whole transformer, `--cuda-graphs` captures a whole
compiled step as one CUDA graph and times its replays: the GPU's time without the host's per launch; `--skip-guards`
times each step with Dynamo's guards checked only where they choose between compiled versions: what the guards cost
the host). Per step: the median of CUDA-event timed forwards after warm-up; `host_ms`, the host's time to issue one
(near the step's time: bound by the launches). Memory: what the row's model holds once ready (weights and kernel
buffers), the peak during the timed steps, both over what was allocated before the row (`held_before_GiB`, 0 unless
an earlier row's model outlived it), and the tensors as ditq stores them. The results file gathers runs: a run
appends its rows to OUT.json (with the GPU, versions, shapes and the command; `notes` added to a run are printed
above its table) and OUT.md is rewritten from all of them after every row, so a run cut short keeps what it
measured. A compiled row says what the FP8 fusion pass folded in the graphs it compiled (`fused`, by kind; block by
block, each block class counts once); `--profile` writes each row's kernels by GPU time and the host's Python
functions by own time.

    PYTHONPATH=. python bench/bench_diffusers.py --models flux --out bench/results/diffusers_h100
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/bench_diffusers.py --tiny --device cpu --no-compile --out /tmp/d
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import importlib.metadata
import importlib.util
import io
import json
import pstats
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_e2e import TORCHAO, torchao_fp8_row
from torch import nn
from torch._dynamo.utils import counters
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch.profiler import ProfilerActivity, profile

import ditq
from ditq.api import plan
from ditq.atomic import write_json, write_text
from ditq.eval.report import json_scores
from ditq.eval.speed import synchronize, time_calls
from ditq.integrations.diffusers import SUPPORTED, _to
from ditq.io import model_size_bytes
from ditq.kernels import BACKENDS
from ditq.kernels.fp8 import DEFAULT_FAST_ACCUMULATION, FP8_BACKENDS
from ditq.kernels.fusion import COUNTER as FUSION_COUNTER
from ditq.quant.qlinear import QuantLinear
from ditq.recipes import PRESETS, load_recipe


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A diffusers transformer at a published size, its latent side at 1024 px and its text tokens."""

    class_name: str
    config: dict[str, Any]
    tiny: dict[str, Any]  # overrides for a CPU check
    size: int  # latent side (FLUX: packed tokens per side)
    text_tokens: int


MODELS = {
    "flux": ModelSize(  # FLUX.1-dev
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
        dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
             pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)),
        size=64,  # 128×128 latents packed 2×2: 4,096 tokens
        text_tokens=512,
    ),
    "sd3": ModelSize(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
        "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        dict(sample_size=8, num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
             caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=8),
        size=128,
        text_tokens=333,  # 77 CLIP + 256 T5
    ),
    "pixart": ModelSize(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
        "PixArtTransformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
             num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
             activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
             norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False),
        dict(sample_size=8, num_layers=2, attention_head_dim=32, num_attention_heads=2, cross_attention_dim=64,
             caption_channels=32, interpolation_scale=1),
        size=128,
        text_tokens=300,
    ),
}  # fmt: skip
TINY_SIZE, TINY_TEXT_TOKENS = 4, 8  # FLUX: 16 packed tokens; SD3, PixArt: 4×4 latents, 4 tokens of 2×2 patches
DTYPE = torch.bfloat16
OPTIONS = {"+fast-accum": ("fast_accumulation", True), "+exact-accum": ("fast_accumulation", False),
           "+static-launch": ("static_launch", True), "+unjoined": ("join", False)}  # suffix → the field it sets
DEFAULT_CONFIGS = ("bf16", "w4a8-fp8@fp8-cached", "w4a8-fp8@fp8-cached+exact-accum", "w4a8-fp8@fp8",
                   "w4a8-fp8@fp8+exact-accum", TORCHAO)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    """One row's model: `bf16`, torchao's float8 row-wise, or a ditq recipe on a backend."""

    label: str
    recipe: str | None = None
    backend: str | None = None
    fast_accumulation: bool | None = None  # FP8 backends only; None: the backend's default
    static_launch: bool = False  # compiled with inductor's static launcher for ditq's Triton kernels
    join: bool = True  # "fp8-cached" joins the weights of layers that read one input (one GEMM for q, k, v)

    @classmethod
    def parse(cls, label: str) -> Config:
        if label in ("bf16", TORCHAO):
            return cls(label)
        base, suffixes = label, {}  # Config field → the suffix that sets it, read from the end
        while suffix := next((s for s in OPTIONS if base.endswith(s)), None):
            field = OPTIONS[suffix][0]
            if field in suffixes:
                raise ValueError(f"config {label!r}: {suffix} and {suffixes[field]} both set {field}")
            suffixes[field], base = suffix, base.removesuffix(suffix)
        recipe, at, backend = base.partition("@")
        if not at or backend not in BACKENDS:
            raise ValueError(f"config {label!r} is not bf16, {TORCHAO} or RECIPE@BACKEND with suffixes of "
                             f"{list(OPTIONS)} and a backend of {sorted(BACKENDS)}")  # fmt: skip
        if "fast_accumulation" in suffixes and backend not in FP8_BACKENDS:
            raise ValueError(f"config {label!r}: {suffixes['fast_accumulation']} needs an FP8 backend "
                             f"{list(FP8_BACKENDS)}")  # fmt: skip
        if "join" in suffixes and backend != "fp8-cached":
            raise ValueError(f"config {label!r}: +unjoined needs fp8-cached, the backend that joins GEMMs")
        try:  # an unknown preset or a bad file fails here, before any model is built
            load_recipe(recipe)
        except (ValueError, TypeError, OSError) as err:
            raise ValueError(f"config {label!r}: {err}") from None
        return cls(label, recipe, backend, **{field: OPTIONS[suffix][1] for field, suffix in suffixes.items()})


def build(size: ModelSize, tiny: bool, device: str) -> nn.Module:
    """The transformer with seeded random weights in bf16, scaled by ½ (random adaLN modulation needs it)."""
    import diffusers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(diffusers, size.class_name)(**(size.config | size.tiny if tiny else size.config))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prepare(model: nn.Module, config: Config) -> str | None:
    """Quantize `model` in place as `config` says; returns how many quantized Linears run on its backend."""
    if config.label == TORCHAO:
        targets = plan(model, PRESETS["w4a8-fp8"])  # ditq's Linears: the adapter's default skip
        torchao_fp8_row(model, lambda module, name: name in targets)
        return f"{len(targets)} Linears"
    if config.recipe is None:
        return None
    ditq.quantize(model, load_recipe(config.recipe))
    options = {} if config.fast_accumulation is None else {"fast_accumulation": config.fast_accumulation}
    ditq.prepare_for_inference(model, config.backend, dtype=DTYPE, join=config.join, **options)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return f"{sum(m.backend == config.backend for m in layers)}/{len(layers)} on {config.backend}"


def compiled(model: nn.Module, whole_graph: bool) -> nn.Module:
    """The model compiled whole, or each block of its ModuleLists compiled in place (diffusers' regional
    compilation: one compile per block class, reused by the others)."""
    if whole_graph:
        return torch.compile(model, dynamic=False)
    for blocks in model.children():
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile(dynamic=False)
    return model


def graphed(step: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    """`step`, compiled already, captured as one CUDA graph: each call replays it, one launch for all its kernels.

    Not inductor's CUDA graphs (mode 'reduce-overhead'): with blocks compiled one by one, a block class's graph
    replays for the next block while the previous replay's output is still to be read (the residual stream), and
    cudagraph trees stop with "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent
    run" (PixArt-size, torch 2.11 on an H100)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def measure(model_name: str, batch: int, config: Config, args: argparse.Namespace,
            reference: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One row: build, quantize, compile, time; `reference` holds the bf16 row's step and output."""
    size = MODELS[model_name]
    on_cuda = args.device.startswith("cuda")
    gc.collect()  # the previous row's model, whose compiled blocks form reference cycles
    if on_cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()  # what this row's memory figures leave out (0 unless one leaked)
    start = time.perf_counter()
    model = build(size, args.tiny, args.device)
    layers = prepare(model, config)
    prepare_s = time.perf_counter() - start
    adapter = SUPPORTED[size.class_name]
    gen = torch.Generator().manual_seed(1)
    side, text = (TINY_SIZE, TINY_TEXT_TOKENS) if args.tiny else (size.size, size.text_tokens)
    inputs = _to(adapter.example_inputs(model, batch, side, text, 0.5, gen), torch.empty(0, dtype=DTYPE, device=args.device))
    if on_cuda:
        gc.collect()
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated() - before
    counters.clear()
    forward = model if args.no_compile else compiled(model, args.whole_graph)

    def step() -> torch.Tensor:
        return forward(**inputs, return_dict=False)[0]

    device = torch.device(args.device)
    with torch.no_grad():
        start = time.perf_counter()
        launch = {"static_launch_user_defined_triton_kernels": True} if config.static_launch else {}
        with inductor_config.patch(fx_graph_cache=False, **launch), functorch_config.patch(enable_autograd_cache=False):
            out = step().float()  # compiles with the passes run, not read from a cache: `fused` counts them
        first_s = time.perf_counter() - start
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        timed = graphed(step, device) if args.cuda_graphs else step
        # --skip-guards: Dynamo checks only the guards that tell a function's compiled versions apart
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=args.skip_guards):
            times = time_calls(timed, (), device, warmup=args.warmup, repeats=args.iters)
            host = host_ms(timed, device, args.iters)
            if args.profile:  # the label's '@' and '+' as '_': file names any copying tool takes
                name = re.sub(r"[^\w.-]", "_", f"{model_name}_b{batch}_{config.label}")
                write_text(f"{args.out}_profile_{name}.txt", kernel_table(timed, device))
    fast = DEFAULT_FAST_ACCUMULATION if config.fast_accumulation is None else config.fast_accumulation
    row = {"model": model_name, "batch": batch, "config": config.label,
           "fast_accum": fast if config.backend in FP8_BACKENDS else None,
           "static_launch": config.static_launch or inductor_config.static_launch_user_defined_triton_kernels,
           "step_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
           "max_ms": round(max(times), 2), "host_ms": round(host, 2), "layers": layers,
           "fused": ", ".join(f"{kind} {n}" for kind, n in sorted(counters[FUSION_COUNTER].items())) or None}  # fmt: skip
    if config.label == "bf16":
        reference.update(step_ms=row["step_ms"], out=out)
    elif "out" in reference:
        row["x_bf16"] = round(reference["step_ms"] / row["step_ms"], 3)
        row["rel_err_vs_bf16"] = float((out - reference["out"]).norm() / reference["out"].norm())
    if on_cuda:
        row |= {"resident_GiB": round(resident / 2**30, 2),
                "peak_GiB": round((torch.cuda.max_memory_allocated() - before) / 2**30, 2),
                "held_before_GiB": round(before / 2**30, 2)}  # fmt: skip
    if config.label != TORCHAO:  # torchao's tensor subclasses are no ditq checkpoint
        row["stored_GiB"] = round(model_size_bytes(model, DTYPE) / 2**30, 3)
    row |= {"compile_s" if not args.no_compile else "first_call_s": round(first_s, 1),
            "prepare_s": round(prepare_s, 1),
            "graphs": counters["stats"]["unique_graphs"]}  # fmt: skip
    torch._dynamo.reset()  # drops the compiled blocks, which hold the model
    return row


def kernel_table(step: Callable[[], torch.Tensor], device: torch.device) -> str:
    """Three profiled steps: the kernels (on a GPU) or operators (on the CPU) by total time, where a step goes;
    then the Python functions by their own time over three more steps, where the host's time goes."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(device)
    python = cProfile.Profile()
    with python:
        for _ in range(3):
            step()
    synchronize(device)
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(30)
    return (prof.key_averages().table(sort_by="cuda_time_total" if on_cuda else "cpu_time_total", row_limit=40,
                                      max_name_column_width=90)
            + "\n\nThe host: Python functions by own time over 3 steps\n" + text.getvalue())  # fmt: skip


def host_ms(step: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """The host's time to issue one step from an idle GPU, the median of `repeats`: a step whose host time is
    near its GPU time is bound by its launches (a step of more kernels than CUDA queues blocks at the queue)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def environment(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    on_cuda = args.device.startswith("cuda")
    return {
        "gpu": torch.cuda.get_device_name() if on_cuda else args.device,
        **{p: version(p) for p in ("torch", "triton", "diffusers", "torchao")},
        "command": shlex.join(["python", "bench/bench_diffusers.py", *argv]),
        "compile": "off" if args.no_compile else ("whole graph" if args.whole_graph else "block by block")
                   + (", CUDA graphs" if args.cuda_graphs else "") + (", guards skipped" if args.skip_guards else ""),
        # whether inductor launches user-defined Triton kernels (ditq's) through its static launcher, as its own
        "static_launch_user_kernels": inductor_config.static_launch_user_defined_triton_kernels,
        "dtype": "bfloat16",
        "warmup": args.warmup,
        "iters": args.iters,
        "shapes": {
            name: {"class": MODELS[name].class_name,
                   "config": MODELS[name].config | MODELS[name].tiny if args.tiny else MODELS[name].config,
                   "latent_side": TINY_SIZE if args.tiny else MODELS[name].size,
                   "text_tokens": TINY_TEXT_TOKENS if args.tiny else MODELS[name].text_tokens}
            for name in args.models
        },  # fmt: skip
        "rows": [],
    }


COLUMNS = ("model", "batch", "config", "step_ms", "x_bf16", "host_ms", "resident_GiB", "peak_GiB", "stored_GiB",
           "rel_err_vs_bf16", "compile_s", "layers", "fused")  # fmt: skip


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["# diffusers transformers: bf16, torchao float8 row-wise, ditq W4A8-FP8", "",
             "Written by `bench/bench_diffusers.py`; ratios (× bf16: bf16's step over the row's) are within one run."]  # fmt: skip
    for run in runs:
        lines += ["", f"{run['gpu']}; torch {run['torch']}, Triton {run['triton']}, diffusers {run['diffusers']}, "
                  f"torchao {run['torchao']}; compile: {run['compile']}"
                  f"{'; static launch of ditq kernels' if run.get('static_launch_user_kernels') else ''}; median of "
                  f"{run['iters']} steps after {run['warmup']} warm-up", "", f"    {run['command']}", "",
                  *(f"{note}\n" for note in run.get("notes", ())),
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in run["rows"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) and abs(value) < 0.1 else str(value)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results stem: OUT.json (runs appended) and OUT.md")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated; bf16 runs first")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="two-block models at a few tokens, for a CPU check")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--whole-graph", action="store_true", help="compile the whole transformer, not block by block")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each compiled row's step captured as one CUDA graph (a CUDA device)")
    parser.add_argument("--skip-guards", action="store_true",
                        help="time compiled rows with Dynamo's guards skipped where they don't choose a compiled "
                             "version (torch.compiler.set_stance's skip_guard_eval_unsafe): their host cost")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also profile 3 steps of each row: OUT_profile_<model>_b<batch>_<config>.txt")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.models = [m for m in args.models.split(",") if m]
        unknown = sorted(set(args.models) - set(MODELS))
        if unknown or not args.models:
            raise ValueError(f"--models {unknown or '(none)'}: choose from {', '.join(MODELS)}")
        args.batches = [int(b) for b in args.batches.split(",") if b]
        if not args.batches or min(args.batches) < 1 or args.warmup < 0 or args.iters < 1:
            raise ValueError("batches and --iters must be positive, --warmup at least 0")
        configs = [Config.parse(c) for c in dict.fromkeys(args.configs.split(",")) if c]
        configs.sort(key=lambda c: c.label != "bf16")  # stable: the others keep their order
        if not configs:
            raise ValueError("--configs names no config")
        if any(c.label == TORCHAO for c in configs) and importlib.util.find_spec("torchao") is None:
            raise ValueError(f"{TORCHAO} needs torchao, which is not installed")
        if importlib.util.find_spec("diffusers") is None:
            raise ValueError("the transformers come from diffusers, which is not installed")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device here")
        if args.cuda_graphs and (args.no_compile or not args.device.startswith("cuda")):
            raise ValueError("--cuda-graphs replays compiled steps on a CUDA device: not with --no-compile or "
                             f"--device {args.device}")  # fmt: skip
        if args.no_compile and args.skip_guards:
            raise ValueError("--skip-guards skips the guards of compiled code: not with --no-compile")
        if args.no_compile and any(c.static_launch for c in configs):
            raise ValueError("+static-launch is how compiled code launches ditq's kernels: not with --no-compile")
        json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
        runs = json.loads(json_path.read_text())["runs"] if json_path.exists() else []
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        parser.error(f"{err}" if not isinstance(err, (KeyError, json.JSONDecodeError))
                     else f"{args.out}.json exists and is no results file of this script")  # fmt: skip
    run = environment(args, argv)
    runs.append(run)
    for model_name in args.models:
        for batch in args.batches:
            reference: dict[str, Any] = {}
            for config in configs:
                row = measure(model_name, batch, config, args, reference)
                run["rows"].append(row)
                print(json.dumps(row), flush=True)
                write_json(json_path, json_scores({"runs": runs}), indent=2)  # a NaN error reads "nan"
                write_text(md_path, markdown(runs))
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    print(markdown([run]))


if __name__ == "__main__":
    main()
