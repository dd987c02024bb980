"""ditq: quantization toolkit for diffusion transformers.

Five verbs: `quantize`, `calibrate`, `save`, `load`, `use_kernels`; one frozen recipe per method.
"""

__version__ = "0.1.0"

from ditq import methods as _methods  # noqa: E402,F401  (registers every method)
from ditq.api import quantize  # noqa: E402
from ditq.calib import CalibData, calibrate  # noqa: E402
from ditq.io import CheckpointError, load, save  # noqa: E402
from ditq.kernels import use_kernels  # noqa: E402
from ditq.recipes import RTN, Recipe, load_recipe  # noqa: E402

__all__ = [
    "RTN",
    "CalibData",
    "CheckpointError",
    "Recipe",
    "calibrate",
    "load",
    "load_recipe",
    "quantize",
    "save",
    "use_kernels",
]
