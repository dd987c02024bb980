"""The kernels draw the same DiT-MNIST samples as the reference: PSNR/SSIM of each backend's images against the
reference backend's, from the same noise, on one GPU.

    python bench/samples_match.py --out bench/results/samples_match_h100.json

The bundled model quantized with per-channel int4 + FP8 activations on every block Linear and the adaLN
(`w4a8-fp8`, embedders and final layer 16-bit), in bf16, sampled eagerly (DDIM 25, cfg 1.5) through the
`reference` backend (dequantize, then matmul), `fp8` and `fp8-cached` (cuBLAS's FP8 GEMMs with fast accumulation
off, then on: `prepare_for_inference(..., fast_accumulation=)`) and `lowbit`; the FP model beside them
says how far quantization itself moves the images. Then the same for per-channel SVDQuant W4A8-FP8 rank 32
(the demo's recipe per channel and without GPTQ), whose FP8 backends run the low-rank branch in e4m3 where the
reference keeps it in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import ditq
from ditq.atomic import write_json
from ditq.bundled import bundled_path
from ditq.demo import DEMO_RECIPE
from ditq.eval.report import json_scores
from ditq.eval.runner import SampleSettings, compare_pixels, draw
from ditq.pipeline import CalibSettings, post_training_quantize
from ditq.recipes import PRESETS

BACKENDS = {  # label: (backend, prepare_for_inference options)
    "reference": ("reference", {}),
    "fp8": ("fp8", {"fast_accumulation": False}),
    "fp8-cached": ("fp8-cached", {"fast_accumulation": False}),
    "fp8, fast accumulation": ("fp8", {"fast_accumulation": True}),
    "fp8-cached, fast accumulation": ("fp8-cached", {"fast_accumulation": True}),
    "lowbit": ("lowbit", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (a CPU smoke run: --samples 1 --steps 2)")
    parser.add_argument(
        "--device", default="cuda", help="cpu needs TRITON_INTERPRET=1 exported for the kernels (slow)"
    )
    args = parser.parse_args()
    settings = SampleSettings(samples=args.samples, steps=args.steps, batch_size=args.samples)
    fp = ditq.load(bundled_path("DiT-MNIST"), device=args.device).to(torch.bfloat16).eval()
    embedders_and_final = ("x_embedder*", "t_embedder*", "y_embedder*", "final_layer*")  # kept 16-bit
    recipes = {
        "w4a8-fp8": dataclasses.replace(PRESETS["w4a8-fp8"], skip=embedders_and_final),
        "svdquant-w4a8-fp8-r32": dataclasses.replace(DEMO_RECIPE, group_size=None, a_group_size=None, gptq=False),
    }
    models = {}
    with torch.no_grad():
        images_fp = draw(fp, settings)[0]
    for name, recipe in recipes.items():
        model = ditq.load(bundled_path("DiT-MNIST"), device=args.device)  # quantized in float32, run in bf16
        ptq = post_training_quantize(model, recipe, settings=CalibSettings(seed=1))
        quantized = ptq.model.to(torch.bfloat16).eval()
        with torch.no_grad():
            images = {"fp": images_fp}
            for label, (backend, options) in BACKENDS.items():
                ditq.prepare_for_inference(quantized, backend, dtype=torch.bfloat16, **options)
                images[label] = draw(quantized, settings)[0]
        models[name] = {b: compare_pixels(im, images["reference"]) for b, im in images.items() if b != "reference"}
    result = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "settings": dataclasses.asdict(settings),
              "vs_reference_backend": models}  # fmt: skip
    write_json(args.out, json_scores(result), indent=2)  # identical images: PSNR inf, written "inf"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
