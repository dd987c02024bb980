"""Checks shared by the frozen settings dataclasses (sampling, calibration, timing, search)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["check_count", "check_counts"]


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
