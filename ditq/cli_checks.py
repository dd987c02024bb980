"""The `ditq` command line's shared parts: one-line errors, argument types and path checks.

Bad values are refused before any work; a user error ends in one line, `ditq <command>: error: …`, exit 2.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ditq.atomic import TEMP_NAME, write_json

__all__ = ["USER_ERRORS", "HelpFormatter", "OneLineParser", "UsageError",
           "default_device", "device_arg", "error_line", "finite_float",
           "positive_int", "rerun_command", "run_command", "served_bits", "served_bits_list", "write_report"]

# Errors that bad input (a flag, a file, a recipe) raises; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)


# ---- one-line errors --------------------------------------------------------------------------------


class UsageError(Exception):
    """A command line that argparse refused; the message is the one line to print."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, not argparse's usage block (`--help` still shows the usage)."""
        raise UsageError(f"{self.prog}: error: {message}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs keep their line breaks; a flag's help ends with its default where it has one
    worth showing (not None, False or an empty list). `ditq train` and `ditq search` use it too."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def error_line(err: BaseException) -> str:
    """The error as one line for a user: the file it names, no temporary file names, no repr quoting."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    elif isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    text = TEMP_NAME.sub(r"\g<target>", text)  # `.model.safetensors.41.k3j_x9ab.tmp` → `model.safetensors`
    return " ".join(text.split())


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                command: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse `argv` with `parser` (a `OneLineParser` with `--debug`) and return `command(args)`'s exit code.

    A user error is one line, `<prog>: error: …`, and exit 2 (`--debug`: the traceback); Ctrl-C is exit 130.
    `<prog>` names the subcommand too where the parser has subcommands (`ditq quantize`).
    """
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    prog = " ".join(filter(None, (parser.prog, getattr(args, "command", None))))
    try:
        return command(args) or 0
    except torch.cuda.OutOfMemoryError:
        if args.debug:
            raise
        print(f"{prog}: error: out of GPU memory; try fewer samples or a smaller batch size", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def rerun_command(command: str, argv: Sequence[str]) -> str:
    """The shell line that runs `ditq <command> argv` again; under torchrun, with as many processes again."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["ditq", command] if world_size == 1 else ["torchrun", "--nproc_per_node", str(world_size), "-m",
                                                          f"ditq.{command}"]  # fmt: skip
    return shlex.join([*launcher, *argv])


# ---- argument types: refused at parse time, before anything is loaded -----------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def served_bits(text: str) -> int | str:
    """A width to serve a nested (MatQuant) checkpoint at, 2..8, or the path of a JSON per-layer plan
    (`ditq.load(path, bits=...)`); a plan's contents are checked against the checkpoint when it loads."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"one width or plan here, got {text!r} (ditq eval scores several)")
    try:
        width = int(text)
    except ValueError:
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(f"expected a width (2..8) or a JSON plan file, got {text!r}") from None
        return text
    if not 2 <= width <= 8:
        raise argparse.ArgumentTypeError(f"widths are 2..8 bits, got {width}")
    return width


def served_bits_list(text: str) -> list[int | str]:
    """Comma-separated `served_bits` (`8,4,2`, `4,plan.json`), each once."""
    items = [served_bits(item) for item in text.split(",")]
    if len(set(map(str, items))) < len(items):
        raise argparse.ArgumentTypeError(f"{text!r} names a width or plan twice")
    return items


def device_arg(text: str) -> str:
    from ditq.fileformat import check_device

    try:
        check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- outputs written after the work -------------------------------------------------------------


def write_report(path: Path, report: dict, checkpoint: Path) -> None:
    """`--report`, written once the checkpoint is saved: should it fail, the checkpoint stays and the error
    says so (the report is checked writable before any work, so this takes a full disk or the like)."""
    from ditq.eval.report import json_scores

    try:
        write_json(path, json_scores(report))
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror or err}; {checkpoint} is saved, without this report",
                      err.filename or str(path)) from err
