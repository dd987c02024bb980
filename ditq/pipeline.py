"""Post-training quantization as the CLI and the demo run it: calibrate → quantize → report.

`ditq quantize`, `ditq eval --recipe` and `ditq demo` all go through `post_training_quantize`, so they
calibrate with the same settings and report the same per-layer errors and sizes: their numbers can be
put side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ditq.api import check_plan, quantize, shallow_clone
from ditq.calib import CalibData, calibrate
from ditq.checks import check_counts
from ditq.eval.layers import layer_errors
from ditq.io import model_size_bytes
from ditq.progress import stage
from ditq.recipes import Recipe
from ditq.threads import torch_threads


@dataclass(frozen=True)
class CalibSettings:
    """How calibration inputs are drawn along the FP model's own sampling trajectories.

    The default seed (1) differs from the evaluation seed (0), so a model is never calibrated on the
    very noise it is then scored on.
    """

    samples: int = 16
    steps: int = 25
    seed: int = 1

    def __post_init__(self) -> None:
        check_counts(self, ("samples", "steps"), what="calibration ")

    def calibrate(self, fp_model: nn.Module, progress: bool = False) -> CalibData:
        """Sample `fp_model` with these settings and record what every Linear sees."""
        return calibrate(fp_model, n_samples=self.samples, steps=self.steps, seed=self.seed, progress=progress)


@dataclass(frozen=True)
class PTQResult:
    """A quantized model and what it costs: per-layer errors against the FP model, and sizes in bytes."""

    model: nn.Module
    recipe: Recipe
    calib: CalibData
    settings: CalibSettings
    layers: list[dict[str, Any]]
    float_dtype: torch.dtype  # what the layers left in high precision are stored in (`ditq.save(float_dtype=)`)
    fp16_size_bytes: int  # the FP model's tensors in 16-bit floats: what compression is measured against
    quant_size_bytes: int  # the quantized model's tensors as `ditq.save(float_dtype=)` writes them

    def report(self) -> dict[str, Any]:
        """JSON-serialisable summary (recipe, calibration settings, sizes, per-layer errors)."""
        return {
            "recipe": self.recipe.to_dict(),
            "calibration": asdict(self.settings),
            "float_dtype": str(self.float_dtype).removeprefix("torch."),
            "fp16_size_bytes": self.fp16_size_bytes,
            "quant_size_bytes": self.quant_size_bytes,
            "layers": self.layers,
        }


def post_training_quantize(
    fp_model: nn.Module,
    recipe: Recipe,
    *,
    settings: CalibSettings | None = None,
    calib: CalibData | None = None,
    float_dtype: torch.dtype = torch.float16,
    progress: bool = False,
) -> PTQResult:
    """Calibrate `fp_model` (unless `calib` is given), quantize a copy with `recipe`, measure it.

    `fp_model` is left untouched. The recipe's plan (`ditq.api.check_plan`: patterns, group sizes against
    each layer, the method's own checks, an already quantized model) is checked before the calibration, so
    a mistake costs no sampling time. Pass `calib` to quantize one FP model with several recipes from the
    same calibration data (check the plan first, as here, if you calibrate yourself). Sizes count the
    high-precision layers in `float_dtype` (16-bit by default, the precision DiTs ship in); save with the
    same `float_dtype`. `progress` prints a line as each stage starts, and progress bars.
    """
    settings = settings or CalibSettings()
    targets = check_plan(fp_model, recipe)
    if calib is None:
        stage(progress, f"calibrating: {settings.samples} samples × {settings.steps} steps (seed {settings.seed})")
        calib = settings.calibrate(fp_model, progress=progress)
    stage(progress, f"quantizing {len(targets)} layers with {type(recipe).__name__}")
    quant_model = quantize(shallow_clone(fp_model), recipe, calib=calib)  # FP tensors shared, not copied
    with torch_threads(1):  # one layer on a few thousand rows at a time: threads would only wait for each other
        layers = layer_errors(fp_model, quant_model, calib.inputs)
    return PTQResult(
        model=quant_model,
        recipe=recipe,
        calib=calib,
        settings=settings,
        layers=layers,
        float_dtype=float_dtype,
        fp16_size_bytes=model_size_bytes(fp_model, torch.float16),
        quant_size_bytes=model_size_bytes(quant_model, float_dtype),
    )
