"""The kernels draw the same DiT-MNIST samples as the reference: PSNR/SSIM of each backend's images against the
reference backend's, from the same noise, on one GPU.

    python bench/samples_match.py --out bench/results/samples_match_h100.json

The bundled model quantized with per-channel int4 + FP8 activations on every block Linear and the adaLN
(`w4a8-fp8`, embedders and final layer 16-bit), in bf16, sampled eagerly (DDIM 25, cfg 1.5) through the
`reference` backend (dequantize, then matmul), `fp8`, `fp8-cached` and `lowbit`; the FP model beside them
says how far quantization itself moves the images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import ditq
from ditq.bundled import bundled_path
from ditq.eval.runner import SampleSettings, compare_pixels, draw
from ditq.recipes import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument(
        "--device", default="cuda", help="cpu needs TRITON_INTERPRET=1 exported for the kernels (slow)"
    )
    args = parser.parse_args()
    settings = SampleSettings(samples=args.samples, steps=25, batch_size=args.samples)
    fp = ditq.load(bundled_path("DiT-MNIST"), device=args.device).to(torch.bfloat16).eval()
    recipe = dataclasses.replace(
        PRESETS["w4a8-fp8"], skip=("x_embedder*", "t_embedder*", "y_embedder*", "final_layer*")
    )
    quantized = ditq.quantize(
        ditq.load(bundled_path("DiT-MNIST"), device=args.device).to(torch.bfloat16), recipe
    ).eval()
    with torch.no_grad():
        images = {"fp": draw(fp, settings)[0]}
        for backend in ("reference", "fp8", "fp8-cached", "lowbit"):
            ditq.prepare_for_inference(quantized, backend, dtype=torch.bfloat16)
            images[backend] = draw(quantized, settings)[0]
    rows = {
        name: compare_pixels(im, images["reference"]) for name, im in images.items() if name != "reference"
    }
    result = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__, "settings": dataclasses.asdict(settings),
              "vs_reference_backend": rows}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
