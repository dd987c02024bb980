"""ditq: quantization toolkit for diffusion transformers.

The verbs: `calibrate`, `quantize`, `save`, `load`, `prepare_for_inference`, and for quantization-aware
training `prepare` → train → `convert`; one frozen recipe per method.
"""

from ditq import methods as _methods  # noqa: F401,I001  (registers every method; after the version import)
from ditq._version import __version__
from ditq.api import quantize
from ditq.calib import CalibData, calibrate
from ditq.fileformat import CheckpointError
from ditq.io import load, save
from ditq.kernels import prepare_for_inference
from ditq.qat import QAT, convert, prepare
from ditq.recipes import RTN, Recipe, load_recipe

__all__ = [
    "QAT",
    "RTN",
    "CalibData",
    "CheckpointError",
    "Recipe",
    "__version__",
    "calibrate",
    "convert",
    "load",
    "load_recipe",
    "prepare",
    "prepare_for_inference",
    "quantize",
    "save",
]
