"""Checks shared by the frozen settings dataclasses (sampling, calibration, timing, search), and the
naming of the layer in errors raised deep inside a method."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["check_count", "check_counts", "naming_layer"]


def check_counts(settings: object, names: Iterable[str], *, minimum: int = 1, what: str = "") -> None:
    """Each named field of `settings` must be an int (not a bool) ≥ `minimum`; the error names the field,
    prefixed by `what` (e.g. "calibration ")."""
    for name in names:
        check_count(name, getattr(settings, name), minimum=minimum, what=what)


def check_count(name: str, value: object, *, minimum: int = 1, what: str = "") -> None:
    """`value` must be an int (not a bool) ≥ `minimum`; the error names it as `what` + `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what}{name} must be {need}, got {value!r}")


@contextmanager
def naming_layer(name: str) -> Iterator[None]:
    """Prefix a ValueError raised inside with the layer (or input group) it concerns: the numerical steps
    of a method (a Hessian, a Cholesky factor) see tensors, not which layer they came from."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
