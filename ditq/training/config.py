"""`TrainConfig`: every knob of a DiT training run, validated once, stored in each checkpoint.

Defaults follow the DiT paper (AdamW, constant lr 1e-4, no weight decay, EMA 0.9999, global batch
256, 1000 linear-β steps) except where DiT-MNIST differs: the whole dataset lives on the device, so
there is no loader, no worker processes and no horizontal flip (a flipped digit is another glyph).

Quantization-aware training is the same run with a `recipe` (a `ditq.qat.QAT` as plain data): the model
is prepared before the first step, optionally from `init_from`'s full-precision weights, and trained on
the diffusion loss or by distillation from a frozen `teacher`.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ditq.atomic import json_text
from ditq.checks import did_you_mean

MIXED_PRECISION = ("auto", "bf16", "no")
LR_SCHEDULES = ("constant", "cosine", "step")
LOSSES = ("diffusion", "distill")

# Fields that decide which samples, noise, model and objective a step sees: a resume must not change
# them, or "continue the run" silently becomes a different run.
RESUME_FIXED = (
    "model", "model_overrides", "global_batch_size", "seed", "num_timesteps", "hflip", "data", "data_dir",
    "recipe", "loss", "teacher", "teacher_steps", "init_from",
)  # fmt: skip


@dataclass
class TrainConfig:
    """One training run. `steps` counts optimizer steps (global batches), not epochs."""

    model: str = "DiT-MNIST"  # zoo name (ditq.models.MODEL_CONFIGS)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # constructor kwargs, e.g. depth=2
    data: str = "mnist"  # data source (ditq.training.data.DATA_SOURCES)
    data_dir: str | None = None  # the source's folder; None = its default (MNIST: the copy bundled with ditq)
    recipe: dict[str, Any] | None = None  # a QAT recipe as data ({"method": "qat", ...}); None = FP training
    loss: str = "diffusion"  # "diffusion" (DiT's objective) or "distill" (match `teacher`'s outputs)
    teacher: str | None = None  # distill: a zoo name with bundled weights or a ditq checkpoint path
    teacher_steps: int = 25  # distill: DDIM steps of the teacher trajectories the inputs are taken from
    init_from: str | None = None  # start from these weights (zoo name with bundled weights or checkpoint)
    out_dir: str = "runs/dit-mnist"
    steps: int = 10_000
    global_batch_size: int = 256  # summed over ranks; each rank gets global / world_size
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" (DiT), "cosine" (to min_lr at `steps`) or "step" (TerDiT)
    min_lr: float = 0.0
    lr_decay_step: int | None = None  # "step": from this 0-based step on, lr · lr_decay_factor
    lr_decay_factor: float = 0.1
    warmup_steps: int = 0  # linear ramp from 0 to lr over the first warmup_steps steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global L2 norm; None = no clipping (the norm is still logged)
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(ema_decay, (1+t)/(10+t)): short runs still get a useful EMA
    num_timesteps: int = 1000
    mixed_precision: str = "auto"  # "auto" = bf16 autocast on CUDA, full fp32 on CPU
    compile: bool = False  # torch.compile the model (CUDA only; ignored on CPU)
    hflip: bool = False
    seed: int = 0
    device: str | None = None  # None = cuda:LOCAL_RANK when CUDA is available, else cpu
    log_every: int = 100
    ckpt_every: int = 1000  # a checkpoint is also written at the last step
    resume: bool = False  # continue from out_dir/checkpoints/last.safetensors when it exists
    time_limit_s: float | None = None  # seconds: stop, checkpoint written, after the step that passes them
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # JSON gives lists back
        self.out_dir = str(self.out_dir)  # Path in, str out: the config is stored as JSON
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a zoo name, got {self.model!r}")
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"model_overrides must be a dict, got {type(self.model_overrides).__name__}")
        try:
            json_text(self.model_overrides, what="model_overrides")
        except TypeError as err:
            raise TypeError(
                f"model_overrides must be JSON-serialisable (it is saved with the weights): {err}"
            ) from err
        _check_model(self.model, self.model_overrides)
        self._check_objective()
        for name in (
            "steps",
            "global_batch_size",
            "log_every",
            "ckpt_every",
            "num_timesteps",
            "teacher_steps",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        _check_positive("lr", self.lr)
        if not (_is_real(self.min_lr) and 0.0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr={self.min_lr!r} must lie in [0, lr={self.lr}]")
        if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if len(self.betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} must be two numbers in [0, 1)")
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip)
        if self.time_limit_s is not None:
            _check_positive("time_limit_s", self.time_limit_s)
        if not (_is_real(self.ema_decay) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay={self.ema_decay!r} must lie in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        self._check_step_schedule()
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISION}")
        if not self.out_dir:
            raise ValueError("out_dir must be a non-empty path")
        for name in ("ema_warmup", "compile", "hflip", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_objective(self) -> None:
        """Data source, recipe, loss, teacher and initial weights; the recipe is stored normalised."""
        from ditq.training.data import DATA_SOURCES

        if self.data not in DATA_SOURCES:
            raise ValueError(f"data={self.data!r} is not one of the data sources {sorted(DATA_SOURCES)}")
        if self.recipe is not None:
            self.recipe = _normalise_recipe(self.recipe)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.loss == "distill" and self.teacher is None:
            raise ValueError(
                "loss='distill' needs teacher= (a zoo name with bundled weights or a checkpoint path)"
            )
        if self.loss != "distill" and self.teacher is not None:
            raise ValueError(f"teacher={self.teacher!r} is only used by loss='distill' (loss={self.loss!r})")
        for name in ("teacher", "init_from"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} must be a zoo name or a checkpoint path")

    def _check_step_schedule(self) -> None:
        """TerDiT's schedule: a large initial lr, reduced once late in training."""
        if self.lr_schedule != "step":
            if self.lr_decay_step is not None:
                raise ValueError(f"lr_decay_step={self.lr_decay_step} needs lr_schedule='step'")
            return
        if self.lr_decay_step is None:
            raise ValueError("lr_schedule='step' needs lr_decay_step (the step the lr drops at)")
        _check_int("lr_decay_step", self.lr_decay_step, minimum=max(1, self.warmup_steps))
        if not (_is_real(self.lr_decay_factor) and 0.0 < self.lr_decay_factor <= 1.0):
            raise ValueError(f"lr_decay_factor={self.lr_decay_factor!r} must lie in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are an error so that typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields are: {sorted(known)}")
        return cls(**data)


def _check_model(name: str, overrides: dict[str, Any]) -> None:
    """A zoo name, and overrides that are settings of its constructor, of its settings' types, that build it.

    Models are built on the meta device: no memory, no time (0.1 s for the largest).
    """
    import torch

    from ditq.models import MODEL_CONFIGS, create

    if name not in MODEL_CONFIGS:
        raise ValueError(f"model={name!r} is not a zoo model{did_you_mean(name, MODEL_CONFIGS)} "
                         f"(known: {', '.join(sorted(MODEL_CONFIGS))})")  # fmt: skip
    if not overrides:
        return
    with torch.device("meta"):
        reference = create(name)
    settings = {k: p.default for k, p in inspect.signature(type(reference)).parameters.items()}
    settings |= reference.config  # the zoo's values where it sets them
    for key, value in overrides.items():
        if key not in settings:
            raise ValueError(f"model_overrides: {key!r} is not a setting of {name}{did_you_mean(key, settings)} "
                             f"(settings: {', '.join(settings)})")  # fmt: skip
        types, wanted = _OVERRIDE_TYPES.get(type(settings[key]), ((type(value),), ""))
        if type(value) not in types:  # (NaN and infinities are refused as JSON already)
            raise ValueError(f"model_overrides: {key}={value!r} must be {wanted} ({name} has {key}={settings[key]!r})")
    try:
        with torch.device("meta"):
            create(name, **overrides)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ValueError(f"model_overrides {overrides} do not build {name}: {err}") from None


# a setting's type → the types an override of it may have, and how to say so (bool is no int here)
_OVERRIDE_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a finite number"),
    str: ((str,), "a string"),
}


def _normalise_recipe(data: Any) -> dict[str, Any]:
    """A QAT recipe as the canonical data `QAT.to_dict()` gives, so that a resume compares like with like."""
    from ditq.qat import QAT  # registers the "qat" method; imported here to keep `ditq.train` light
    from ditq.recipes import recipe_from_dict

    if not isinstance(data, dict):
        raise TypeError(
            f"recipe must be a dict such as {{'method': 'qat', 'w_bits': 4}}, got {type(data).__name__}"
        )
    try:
        recipe = recipe_from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"recipe: {err}") from err
    if not isinstance(recipe, QAT):
        raise ValueError(
            f"recipe: method {recipe.method!r} is post-training quantization; training takes a 'qat' recipe"
        )
    return recipe.to_dict()


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_positive(name: str, value: Any) -> None:
    if not (_is_real(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
