"""Turn bench_e2e.py's JSON lines into bench/results/<name>.json and .md (ratios vs bf16, same run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ditq.atomic import write_json, write_text


def main(lines_path: str, out_stem: str) -> None:
    rows = [json.loads(line) for line in Path(lines_path).read_text().splitlines() if line.startswith("{")]
    for timing, ratio in (("median_ms", "speed_vs_bf16"), ("back_to_back_ms", "back_to_back_vs_bf16"),
                          ("sample_median_ms", "sample_speed_vs_bf16")):
        base: dict[tuple, float] = {}  # the fastest bf16 of each (batch, graphs): the baseline to beat
        for r in rows:
            if r["config"].startswith("bf16") and timing in r:
                key = (r["batch"], r["cuda_graphs"])
                base[key] = min(base.get(key, r[timing]), r[timing])
        for r in rows:
            key = (r["batch"], r["cuda_graphs"])
            r[ratio] = base[key] / r[timing] if key in base and timing in r else None
    first = rows[0]
    lines = [
        f"# DiT-XL/2 forward, compiled (fullgraph), {first['gpu']}, torch {first['torch']}, Triton {first['triton']}",
        "",
        "Random weights (675M params), 256×256 latents (32×32×4), batch = images the model sees (CFG doubled).",
        "Quantized rows: ditq recipes through the named kernel backend, or torchao's float8 row-wise (the peer,",
        "weight bytes not counted). Weight MB: as stored; held on GPU: every parameter and buffer, kernel copies",
        "too (`fp8-cached`'s e4m3 weights). Median of the repeats, each a lone call between CUDA events, after",
        "warm-up; back to back: per call of the repeats queued without waiting (the host's launches overlap the",
        "GPU's work, as in sampling). Ratios are against the fastest bf16 row of the same batch in the same run.",
        "Sampling: whole DDIM runs with classifier-free guidance over batch/2 images (steps as given), median.",
        "",
        "| batch | CUDA graphs | config | backend | adaLN quantized | weight MB | held on GPU MB | median ms "
        "| × bf16 speed | back to back ms (× bf16) | sampling ms (× bf16) | compile s | compiled vs eager rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (-r["batch"], not r["config"].startswith("bf16"), r["config"])):
        ratio = "—" if r["speed_vs_bf16"] is None else f"{r['speed_vs_bf16']:.2f}×"
        weights = f"{r['weight_bytes'] / 1e6:.0f}" if r.get("weight_bytes") else "—"
        held = f"{r['gpu_weight_bytes'] / 1e6:.0f}" if r.get("gpu_weight_bytes") else "—"
        back_to_back = "—"  # rows of earlier runs have none
        if "back_to_back_ms" in r:
            versus = "" if r["back_to_back_vs_bf16"] is None else f" ({r['back_to_back_vs_bf16']:.2f}×)"
            back_to_back = f"{r['back_to_back_ms']:.2f}{versus}"
        sampling = "—"
        if "sample_median_ms" in r:  # without a bf16 sampling row in the run, the time alone
            versus = "" if r["sample_speed_vs_bf16"] is None else f" ({r['sample_speed_vs_bf16']:.2f}×)"
            sampling = f"{r['sample_steps']} steps: {r['sample_median_ms']:.0f}{versus}"
        lines.append(
            f"| {r['batch']} | {'yes' if r['cuda_graphs'] else 'no'} | {r['config']} | "
            f"{r.get('backend', 'dequantized' if r['config'] != 'bf16' else '—')} | "
            f"{'yes' if r.get('all_linears') else 'no'} | {weights} | {held} | "
            f"{r['median_ms']:.2f} | {ratio} | {back_to_back} | {sampling} | {r['compile_s']} | {r['compiled_vs_eager_rel_err']:.1e} |"
        )
    write_json(out_stem + ".json", rows, indent=2)
    write_text(out_stem + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
