"""Checks shared by the frozen settings dataclasses (sampling, calibration, timing, search, training), the
naming of the layer in errors raised deep inside a method, and the close match for a misspelt name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["check_count", "check_counts", "did_you_mean", "naming_layer"]


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


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`"; did you mean 'X'?"` for the entry of `known` closest to a misspelt `name` (case aside), else `""`."""
    by_folded = {k.casefold(): k for k in known}
    close = difflib.get_close_matches(name.casefold(), by_folded, n=1, cutoff=0.6)
    return f"; did you mean {by_folded[close[0]]!r}?" if close else ""
