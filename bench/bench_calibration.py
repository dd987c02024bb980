"""Seconds per stage of post-training calibration on the CPU, on a small real model shape.

    PYTHONPATH=. python bench/bench_calibration.py --threads 1 2 --out bench/results/calibration_cpu

The model has the shape of all-MiniLM-L6-v2 (a BERT encoder: 6 layers, hidden 384, intermediate 1536,
12 heads, 36 Linears, 22M parameters) with seeded random weights and LayerNorm gains that give its hidden
states a few outlier channels, as trained BERTs have. It is calibrated on a few hundred tokens, then
quantized with SVDQuant (the default recipe: W4A4, rank 32, the 40-point smoothing grid), SVDQuant + GPTQ
W4A8-FP8, and Q-DiT's GPTQ. Each row is one `torch.set_num_threads` count; `_s` columns are wall seconds,
`_cpu_s` CPU seconds of every thread (more than wall: threads ran in parallel; less: the machine was busy),
and inside SVDQuant the CPU seconds spent computing low-rank branches and in GPTQ. Writes OUT.json and OUT.md
(run it again on another checkout, with PYTHONPATH pointing there, for a before/after pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ditq
from ditq.api import shallow_clone
from ditq.atomic import write_json, write_text
from ditq.methods import svdquant
from ditq.methods.qdit import QDiT
from ditq.methods.svdquant import SVDQuant

HIDDEN, INTERMEDIATE, HEADS, LAYERS, VOCAB = 384, 1536, 12, 6, 30522


class EncoderLayer(nn.Module):
    """One BERT layer, named as in `transformers` (query/key/value, attention.output.dense, intermediate, output)."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.attention_output = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN)
        self.intermediate = nn.Linear(HIDDEN, INTERMEDIATE)
        self.output = nn.Linear(INTERMEDIATE, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, HEADS, d // HEADS).transpose(1, 2) for f in (self.query, self.key, self.value))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        x = self.attention_norm(x + self.attention_output(a))
        return self.output_norm(x + self.output(nn.functional.gelu(self.intermediate(x))))  # (B, T, D)


class MiniLMShape(nn.Module):
    """Token embeddings and six encoder layers; seeded, with outlier channels in every LayerNorm's output."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(LAYERS))
        with torch.no_grad():
            for norm in [m for m in self.modules() if isinstance(m, nn.LayerNorm)]:
                norm.weight[torch.randperm(HIDDEN)[:4]] = 20.0  # a few channels far above the rest

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            x = layer(x)
        return x


RECIPES: dict[str, Callable[[], Any]] = {
    "svdquant_w4a4": lambda: SVDQuant(),
    "svdquant_gptq_w4a8_fp8": lambda: SVDQuant(a_bits=8, a_format="fp8", a_group_size=None, gptq=True),
    "qdit_gptq": lambda: QDiT(),
}


def run(threads: int, tokens: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = MiniLMShape().eval()
    batch = torch.randint(0, VOCAB, (tokens // 128, 128), generator=torch.Generator().manual_seed(1))
    row: dict[str, Any] = {"threads": threads}
    start = time.perf_counter()
    calib = ditq.calibrate(model, run=lambda m: m(batch), rows_per_layer=tokens)
    row["capture_s"] = round(time.perf_counter() - start, 2)
    for name, recipe in RECIPES.items():
        with _cpu_seconds_in(svdquant, ("low_rank_branch", "gptq")) as inside:
            start, cpu = time.perf_counter(), time.process_time()
            ditq.quantize(shallow_clone(model), recipe(), calib)
            row[f"{name}_s"] = round(time.perf_counter() - start, 2)
            row[f"{name}_cpu_s"] = round(time.process_time() - cpu, 2)  # every thread's: waiting shows up here
        if name.startswith("svdquant"):
            row[f"{name}_branch_cpu_s"] = round(inside["low_rank_branch"], 2)
            row[f"{name}_gptq_cpu_s"] = round(inside["gptq"], 2)
        print(json.dumps(row), flush=True)
    return row


@contextmanager
def _cpu_seconds_in(module: Any, names: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """{name: CPU seconds spent inside module.name}, summed over the threads that call it (wrapped meanwhile)."""
    spent = dict.fromkeys(names, 0.0)
    originals = {name: getattr(module, name) for name in names}
    lock = threading.Lock()

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    spent[name] += time.thread_time() - start
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, timed(name, fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    keys = [k for k in rows[0] if k != "threads"]
    lines = [
        "# Calibration time on the CPU (MiniLM-L6 shape: 6 BERT layers, 36 Linears, 22M parameters)",
        "",
        f"- {meta['tokens']} calibration tokens; torch {meta['torch']}; {meta['cpu']}; load average at start "
        f"{meta['load_average']}",
        f"- command: `{meta['command']}`",
        "",
        "| threads | " + " | ".join(k.removesuffix("_s") + " (s)" for k in keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    lines += ["| " + " | ".join(str(r[k]) for k in ["threads", *keys]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens (sequences of 128)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    load = [round(x, 2) for x in os.getloadavg()]
    rows = [run(n, args.tokens) for n in args.threads]
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "tokens": args.tokens,
            "load_average": load, "command": "python bench/bench_calibration.py " + " ".join(
                ["--threads", *map(str, args.threads), "--tokens", str(args.tokens)])}
    print(markdown(rows, meta))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows}, indent=2)
        write_text(args.out.with_suffix(".md"), markdown(rows, meta))


if __name__ == "__main__":
    main()
