"""`from_pretrained(..., quantization_config=DitqConfig("w8a8"))`: a ditq recipe applied as diffusers loads a model.

    from ditq.integrations.diffusers_quantizer import DitqConfig
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                         quantization_config=DitqConfig("w4a8-fp8", backend="fp8"))

diffusers has no plug-in hook for quantizers: importing this module adds "ditq" to the two lookup tables of
`diffusers.quantizers.auto`, after checking that the installed diffusers is a version those tables were
read from (`TESTED_VERSIONS`); any other version gets an ImportError saying so, never a half-registered
quantizer. The recipe is applied once the FP weights are loaded, so only recipes that need no calibration
fit here (RTN presets and recipe files): `DitqConfig` refuses the others when it is made, naming the way
that fits (calibrated methods: `calibrate_pipeline` + `ditq.quantize`; QAT: `ditq train`). Skip patterns
and group sizes are checked against the model's skeleton before its weights are loaded. Quantized models
are saved with `ditq.save` and loaded with `ditq.load`: diffusers' `save_pretrained` would write no
quantized layout, so the quantizer declares itself not serialisable and diffusers refuses that save.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

import diffusers
from diffusers.quantizers import auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from packaging.version import Version
from torch import nn

from ditq.api import check_plan, quantize
from ditq.kernels import ALIASES, BACKENDS, prepare_for_inference
from ditq.recipes import load_recipe
from ditq.registry import method_for

__all__ = ["DitqConfig", "DitqQuantizer", "TESTED_VERSIONS"]

TESTED_VERSIONS = (
    Version("0.35"),
    Version("0.43"),
)  # [lowest, highest): the quantizer tables read from these


class Method(str, Enum):
    """diffusers reads `quant_method.value`; a str Enum also matches the plain "ditq" key of its tables."""

    DITQ = "ditq"


class DitqConfig(QuantizationConfigMixin):
    """A ditq recipe (preset name, recipe file or mapping) that needs no calibration, and the kernel backend
    to prepare the layers for."""

    def __init__(
        self, recipe: str | dict[str, Any] = "w8a8", backend: str = "reference", **kwargs: Any
    ) -> None:
        if kwargs:
            raise ValueError(f"DitqConfig takes recipe and backend; unknown fields {sorted(kwargs)}")
        if not isinstance(recipe, (str, Mapping)):
            raise TypeError(f"DitqConfig(recipe=...) takes a preset name or recipe file path (str) or a mapping, "
                            f"got {type(recipe).__name__} {recipe!r}")
        if not isinstance(backend, str):
            raise TypeError(f"DitqConfig(backend=...) takes a kernel backend name (str), got {type(backend).__name__}")
        parsed = load_recipe(recipe)  # a bad recipe fails here, before any weight is read
        method_for(parsed)  # QAT recipes are trained, not applied
        if parsed.needs() == "calibration":
            raise ValueError(
                f"DitqConfig: recipe {recipe!r} needs calibration data, which loading a model cannot collect; "
                "load the full-precision pipeline, then ditq.quantize(pipe.transformer, recipe, "
                "calib=calibrate_pipeline(pipe, ...)) (ditq.integrations.diffusers)"
            )
        if ALIASES.get(backend, backend) not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {sorted([*BACKENDS, *ALIASES])}")
        self.quant_method = Method.DITQ
        self.recipe = recipe if isinstance(recipe, str) else dict(recipe)
        self.backend = backend
        self.parsed_recipe = parsed  # what the quantizer applies: the recipe as checked here

    @classmethod
    def from_dict(
        cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> DitqConfig | tuple[DitqConfig, dict[str, Any]]:
        """The config a model's `quantization_config` entry describes; `kwargs` are diffusers' loading options,
        none of which a ditq config takes (returned unused when asked, as diffusers' contract says)."""
        config = cls(**{k: v for k, v in config_dict.items() if k != "quant_method"})
        return (config, kwargs) if return_unused_kwargs else config

    def to_diff_dict(self) -> dict[str, Any]:
        """What diffusers prints and stores in the model's config: every field (there are two)."""
        return {"quant_method": self.quant_method.value, "recipe": self.recipe, "backend": self.backend}

    def to_dict(self) -> dict[str, Any]:
        """The fields as given, for JSON (without `parsed_recipe`, which `from_dict` parses again)."""
        return self.to_diff_dict()


class DitqQuantizer(DiffusersQuantizer):
    """Quantizes the model with the config's recipe once its FP weights are loaded."""

    requires_calibration = False

    def __init__(self, quantization_config: DitqConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized:
            raise ValueError(
                "this model's config already names a ditq quantization: ditq checkpoints load with "
                "ditq.load(path, model=...), not from_pretrained"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        check_plan(model, self.quantization_config.parsed_recipe)  # names and shapes: no weights yet
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        quantize(model, config.parsed_recipe)
        return prepare_for_inference(model, config.backend)

    @property
    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    installed = Version(diffusers.__version__)
    lowest, highest = TESTED_VERSIONS
    if not lowest <= Version(installed.base_version) < highest:
        raise ImportError(
            f"ditq's diffusers quantizer fits diffusers >= {lowest}, < {highest}; {installed} is installed "
            "(quantize after loading instead: ditq.quantize(model, recipe))"
        )
    for table in ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING"):
        if not isinstance(getattr(auto, table, None), dict):
            raise ImportError(f"diffusers {installed} has no quantizers.auto.{table}: cannot register ditq")
    auto.AUTO_QUANTIZER_MAPPING[Method.DITQ.value] = DitqQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[Method.DITQ.value] = DitqConfig


_register()
