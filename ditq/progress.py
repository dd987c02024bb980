"""Stage lines for long work (calibrating, compiling, sampling): one line as each stage starts, so a
command that runs for minutes says what it is doing. Printed only when the caller asked for progress."""

from __future__ import annotations

__all__ = ["stage"]


def stage(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)
