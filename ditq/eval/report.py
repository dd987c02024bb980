"""Markdown rendering of `evaluate()` results: one row per model, the FP reference first."""

from __future__ import annotations

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


def render_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and "fid" in v}
    lines = [
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
