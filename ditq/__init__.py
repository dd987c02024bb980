"""ditq: quantization toolkit for diffusion transformers.

The verbs: `calibrate`, `quantize`, `save`, `load`, `prepare_for_inference`, `sample` (zoo models), and for
quantization-aware training `prepare` → train → `convert`; for nested (MatQuant) checkpoints
`set_served_bits` and `export_served`; one frozen recipe per method.
"""

from ditq import methods as _methods  # noqa: F401,I001  (registers every method; after the version import)
from ditq._version import __version__
from ditq.api import quantize
from ditq.calib import CalibData, calibrate
from ditq.fileformat import CheckpointError
from ditq.integrations import diffusers as _diffusers  # noqa: F401  (registers its adapters; no diffusers import)
from ditq.io import load, save
from ditq.kernels import prepare_for_inference
from ditq.qat import QAT, convert, prepare
from ditq.quant.fakequant import set_served_bits
from ditq.quant.export import export_served
from ditq.methods.qdit import QDiT
from ditq.methods.svdquant import SVDQuant
from ditq.recipes import RTN, Recipe, load_recipe
from ditq.sampling import sample

__all__ = [
    "QAT",
    "QDiT",
    "RTN",
    "SVDQuant",
    "CalibData",
    "CheckpointError",
    "Recipe",
    "__version__",
    "calibrate",
    "convert",
    "export_served",
    "load",
    "load_recipe",
    "prepare",
    "prepare_for_inference",
    "quantize",
    "sample",
    "save",
    "set_served_bits",
]
