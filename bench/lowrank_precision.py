"""How much of SVDQuant's quality the FP8 path's low-rank branch keeps: the branch's e4m3 roundings emulated one
by one in the `dequantized` backend, on the bundled DiT-MNIST (CPU; PSNR/SSIM of samples against FP's, same noise).

    python bench/lowrank_precision.py --samples 40

The model: per-channel SVDQuant W4A8-FP8, rank 32, on every block Linear and the adaLN (the demo's recipe per
channel and without GPTQ, which FP8 GEMMs can run). Variants, each adding one rounding of
`ditq.kernels.fp8._lowrank_parts` to the last: the 16-bit branch (SVDQuant's), the branch computed from the
input's e4m3 codes, L1 and P in e4m3, U in one e4m3 rounding, U as two e4m3 parts (what the FP8 backends run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import ditq
import ditq.kernels.reference as reference
from ditq.bundled import bundled_path
from ditq.demo import DEMO_RECIPE
from ditq.eval.runner import SampleSettings, compare_pixels, draw
from ditq.kernels.fp8 import _lowrank_parts
from ditq.pipeline import CalibSettings, post_training_quantize
from ditq.quant.primitives import fp8_quantize
from ditq.quant.qlinear import QuantLinear, quantize_activations

E4M3 = torch.float8_e4m3fn
VARIANTS = {  # name: (branch from X_q's codes, L1 and P in e4m3, U's e4m3 parts: 0 = exact)
    "16-bit branch": None,
    "from X_q's codes": (True, False, 0),
    "+ L1, P in e4m3": (True, True, 0),
    "+ U in one e4m3": (True, True, 1),
    "+ U as two e4m3 parts (the FP8 backends)": (True, True, 2),
}


def e4m3(t: torch.Tensor) -> torch.Tensor:
    return t.to(E4M3).float()


def emulated_branch(m: QuantLinear, h: torch.Tensor, variant: tuple[bool, bool, int]) -> torch.Tensor:
    """(x/smooth)·L1·L2 as the FP8 GEMM computes it, with the chosen roundings."""
    _, rounded, u_parts = variant
    up, down, down_scale, shift = _lowrank_parts(m)
    codes, scale_x = fp8_quantize(h.reshape(-1, h.shape[-1]))
    if not rounded:  # L1 itself, in the same per-rank-column scaling as its codes
        rank = m.lowrank_down.shape[1]
        down = torch.zeros_like(down, dtype=torch.float32)
        l1 = m.lowrank_down.float()
        down[:, :rank] = l1 / (l1.abs().amax(0, keepdim=True).clamp_min(1e-8) / 448)
    p = (codes.float() @ down.float()) * down_scale
    p = e4m3(p) if rounded else p
    u = up if u_parts == 0 else e4m3(up) if u_parts == 1 else e4m3(up) + e4m3(up - e4m3(up))
    return ((p @ u.t()) * scale_x * (m.scales.reshape(1, -1).float() * shift)).reshape(*h.shape[:-1], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    fp = ditq.load(bundled_path("DiT-MNIST")).eval()
    recipe = dataclasses.replace(DEMO_RECIPE, group_size=None, a_group_size=None, gptq=False)
    model = post_training_quantize(fp, recipe, settings=CalibSettings(seed=1)).model.eval()
    ditq.prepare_for_inference(model, "dequantized")
    owners = {
        id(m.lowrank_down): m
        for m in model.modules()
        if isinstance(m, QuantLinear) and m.lowrank_up is not None
    }
    exact = reference.linear_with
    chosen: dict[str, tuple | None] = {"variant": None}

    def linear_with(matmul, x, smooth, lowrank_down, lowrank_up, act_scale, act_zero, spec):
        variant = chosen["variant"]
        if variant is None or lowrank_down is None:
            return exact(matmul, x, smooth, lowrank_down, lowrank_up, act_scale, act_zero, spec)
        h = x if smooth is None else x / smooth.to(x.dtype)
        y = matmul(quantize_activations(h, spec, act_scale, act_zero))
        return y + emulated_branch(owners[id(lowrank_down)], h, variant).to(y.dtype)

    reference.linear_with = linear_with  # the `dequantized` backend's oracle, with the branch emulated
    settings = SampleSettings(samples=args.samples, steps=25, batch_size=args.samples)
    rows = {}
    with torch.no_grad():
        images_fp = draw(fp, settings)[0]
        for name, variant in VARIANTS.items():
            chosen["variant"] = variant
            rows[name] = compare_pixels(draw(model, settings)[0], images_fp)
            print(name, json.dumps(rows[name]), flush=True)
    reference.linear_with = exact
    print(json.dumps({"recipe": recipe.to_dict(), "samples": args.samples, "vs_fp": rows}, indent=1))


if __name__ == "__main__":
    main()
