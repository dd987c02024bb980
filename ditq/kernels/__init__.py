"""The one dispatch point for quantized linears: `quant_linear(x, module)`.

Backends register themselves with `register_backend(name, supports, fn)`; a name is a family
(`"torch"` or `"triton"`) optionally followed by `":variant"` (e.g. `"triton:w4a8_fp8"`). The active
preference (`use_kernels`, a context-local value, default `"auto"`) decides who runs a call:

- `"auto"`: the first registered backend, in registration order, whose `supports` accepts the call;
  otherwise the reference (declines are logged once at DEBUG level).
- `"torch"`: the first registered `torch*` backend that accepts the call; otherwise the reference
  (itself a PyTorch implementation, so this is not a fallback).
- `"triton"`: the first registered `triton*` backend that accepts the call; otherwise the reference,
  and the reason is logged once (warning on logger `ditq.kernels`).
- `"emulated"`: always the reference (`reference.quant_linear_reference`), the oracle every backend
  is tested against.

`supports(spec, x, module)` returns None when the backend can run the call, else a short reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ditq.kernels.reference import emulated, quant_linear_reference

if TYPE_CHECKING:
    from ditq.quant.qlinear import QuantLinear
    from ditq.quant.spec import QuantSpec

Preference = Literal["auto", "torch", "emulated", "triton"]
PREFERENCES: tuple[str, ...] = ("auto", "torch", "emulated", "triton")
FAMILIES: tuple[str, ...] = ("torch", "triton")

SupportsFn = Callable[["QuantSpec", torch.Tensor, "QuantLinear"], "str | None"]
KernelFn = Callable[[torch.Tensor, "QuantLinear"], torch.Tensor]

__all__ = [
    "PREFERENCES",
    "Backend",
    "current_preference",
    "emulated",
    "quant_linear",
    "quant_linear_reference",
    "register_backend",
    "registered_backends",
    "select_backend",
    "unregister_backend",
    "use_kernels",
]

logger = logging.getLogger("ditq.kernels")

REFERENCE = "reference"


@dataclass(frozen=True)
class Backend:
    """A registered kernel: `supports` says whether (and why not) it can run a call, `fn` runs it."""

    name: str
    supports: SupportsFn
    fn: KernelFn

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0]


_BACKENDS: dict[str, Backend] = {}
_PREFERENCE: ContextVar[str] = ContextVar("ditq_kernel_preference", default="auto")


def register_backend(name: str, supports: SupportsFn, fn: KernelFn, *, replace: bool = False) -> None:
    """Add a kernel backend; `name` is `"torch"`/`"triton"`, optionally `":variant"` after it."""
    family = name.split(":", 1)[0] if isinstance(name, str) else None
    if family not in FAMILIES or name.endswith(":"):
        raise ValueError(
            f"backend name {name!r} must be one of {FAMILIES}, optionally followed by ':variant'"
        )
    if name in _BACKENDS and not replace:
        raise ValueError(f"a backend named {name!r} is already registered (pass replace=True)")
    _BACKENDS[name] = Backend(name, supports, fn)


def unregister_backend(name: str) -> None:
    """Remove a backend; KeyError if it was never registered."""
    del _BACKENDS[name]


def registered_backends() -> tuple[str, ...]:
    """Registered backend names in the order `"auto"` tries them."""
    return tuple(_BACKENDS)


def _check_preference(preference: str) -> None:
    if preference not in PREFERENCES:
        raise ValueError(f"kernel preference {preference!r} is not one of {list(PREFERENCES)}")


def current_preference() -> str:
    """The preference in effect in this context (default `"auto"`)."""
    return _PREFERENCE.get()


def use_kernels(preference: Preference) -> contextlib.AbstractContextManager[None]:
    """Choose which kernels run `QuantLinear` calls inside a `with` block (context-local, nestable).

    The preference is validated here, at the call, so a typo fails even outside a `with`.
    """
    _check_preference(preference)
    return _preference_scope(preference)


@contextlib.contextmanager
def _preference_scope(preference: str) -> Iterator[None]:
    token = _PREFERENCE.set(preference)
    try:
        yield
    finally:
        _PREFERENCE.reset(token)


@functools.cache
def _log_fallback_once(preference: str, backend: str, reason: str) -> None:
    """Log each distinct (backend, reason) once; the cache is the memory of what was said."""
    level = logging.WARNING if preference == "triton" else logging.DEBUG
    logger.log(
        level,
        "kernels=%r: %s cannot run this call (%s); using the PyTorch reference",
        preference,
        backend,
        reason,
    )


def select_backend(x: torch.Tensor, module: QuantLinear) -> Backend | None:
    """The backend that would run `quant_linear(x, module)` now; None means the reference."""
    preference = _PREFERENCE.get()
    if preference == "emulated":
        return None
    family = None if preference == "auto" else preference
    candidates = [b for b in _BACKENDS.values() if family is None or b.family == family]
    if not candidates and preference == "triton":
        _log_fallback_once(preference, "triton", "no Triton backend is registered")
    for backend in candidates:
        reason = backend.supports(module.spec, x, module)
        if reason is None:
            return backend
        _log_fallback_once(preference, backend.name, reason)
    return None


def quant_linear(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    """y = QuantLinear(x): validate the input, then run the selected backend (or the reference)."""
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"input has last dim {x.shape[-1]} but the QuantLinear expects in_features={module.in_features}"
        )
    if not x.is_floating_point():
        raise TypeError(f"QuantLinear input must be a floating-point tensor, got {x.dtype}")
    backend = select_backend(x, module)
    if backend is None:
        return quant_linear_reference(x, module)
    return backend.fn(x, module)
