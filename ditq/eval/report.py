"""Reports of evaluation results: the score table in Markdown (one row per model, the FP reference first),
the per-layer error table of a quantized model (each table says which model it is for), and the scores as
strict JSON.

A score need not be finite: the PSNR of identical images is +inf, and an all-zero layer (adaLN-Zero before
training) has a NaN relative error and a −inf SQNR. Strict JSON has no such numbers, so `json_scores` writes
each as the string "inf", "-inf" or "nan", which `float()` reads back; every other value is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

COLUMNS = (
    ("size_bytes", "size (MB)", lambda v: f"{v / 1e6:.2f}"),
    ("fid", "FID", lambda v: f"{v:.2f}"),
    ("class_acc", "class acc", lambda v: f"{v:.4f}"),
    ("is", "IS", lambda v: f"{v:.2f}"),
    ("precision", "precision", lambda v: f"{v:.3f}"),
    ("recall", "recall", lambda v: f"{v:.3f}"),
    ("psnr_vs_fp", "PSNR vs FP (dB)", lambda v: f"{v:.2f}"),
    ("ssim_vs_fp", "SSIM vs FP", lambda v: f"{v:.4f}"),
)

# What each per-layer column measures: y is the FP layer's output on its calibration inputs, ŷ the quantized
# layer's (activation quantization included), W and Ŵ the FP and the served weight; norms are Frobenius.
LAYER_COLUMNS = (
    "- weight rel. err: ‖Ŵ − W‖ / ‖W‖, how far the served weight is from the FP one",
    "- output rel. err: ‖ŷ − y‖ / ‖y‖, the error of the layer's output on real inputs (y: FP output, ŷ: quantized)",
    "- SQNR (dB): 10·log10(‖y‖² / ‖ŷ − y‖²), that output error as a signal-to-noise ratio (higher is better)",
)


def render_table(results: dict[str, Any]) -> str:
    """The score table; `results["fp_model"]`, where present, names the model the rows were made from."""
    s = results["settings"]
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and "fid" in v}
    lines = [
        *([f"Models from {results['fp_model']} (the FP row); every row scored on the same labels and noise.", ""]
          if "fp_model" in results else []),  # fmt: skip
        f"{s['samples']} samples per row, {s['sampler']} {s['steps']} steps, cfg {s['cfg_scale']}, seed {s['seed']}"
        + (f"; device {results['device']}" if "device" in results else ""),
        "",
        "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name, row in rows.items():
        cells = [fmt(row[key]) if key in row else "—" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_layer_table(layers: list[dict[str, Any]], model: str) -> str:
    """The per-layer errors of quantized model `model` (rows of `ditq.eval.layers.layer_errors`)."""
    lines = [
        f"Per-layer quantization error of {model}, on inputs captured along the FP model's sampling trajectories:",
        "",
        *LAYER_COLUMNS,
        "",
        "| layer | shape | bits | group | weight rel. err | output rel. err | SQNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in layers:
        lines.append(
            f"| {row['layer']} | {row['shape']} | {row['w_bits']} | {row['group_size'] or 'ch'} | "
            f"{row['weight_rel_err']:.4f} | {row['output_rel_err']:.4f} | {row['sqnr_db']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def json_scores(data: Any) -> Any:
    """`data` (dicts, lists, numbers, strings) with every non-finite float as "inf", "-inf" or "nan"."""
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {key: json_scores(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_scores(value) for value in data]
    return data
