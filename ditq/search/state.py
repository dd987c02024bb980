"""What a search keeps on disk: its state after every generation (atomic JSON) and a JSONL line per evaluation.

`state.json` holds the settings the search was started with, the generation to run next, its population,
the fitness of every genome evaluated so far and the random generator's state: a killed search restarts from
it and ends exactly where an uninterrupted one would. `evaluations.jsonl` gets one line per fitness
evaluation as soon as it is done, so a kill mid-generation loses no finished evaluation either (a torn line
is ignored). Both are strict JSON: a NaN or infinite number in either is refused, naming the file (and line).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ditq.atomic import append_json_line, write_json

STATE_FILE = "state.json"
LOG_FILE = "evaluations.jsonl"
STATE_VERSION = 1
_START_AGAIN = "delete it to start again"


def save_state(folder: Path, state: dict[str, Any]) -> None:
    write_json(folder / STATE_FILE, {"version": STATE_VERSION, **state}, indent=1)


def load_state(folder: Path) -> dict[str, Any] | None:
    """The saved state, None when the folder holds none; errors name the file and the field."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = _strict_loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a search state ({err}); {_START_AGAIN}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: field 'version' must be {STATE_VERSION}; {_START_AGAIN}")
    for key, kind in (("settings", dict), ("generation", int), ("population", list), ("fitness", dict),
                      ("rng", dict), ("history", list), ("seconds", (int, float))):  # fmt: skip
        if not isinstance(state.get(key), kind) or isinstance(state[key], bool):
            raise ValueError(f"{path}: field {key!r} is missing or not {_KIND_NAMES[kind]}; {_START_AGAIN}")
    if state["generation"] < 0 or state["seconds"] < 0:
        raise ValueError(f"{path}: fields 'generation' and 'seconds' must be >= 0; {_START_AGAIN}")
    if not all(isinstance(key, str) for key in state["population"]):
        raise ValueError(f"{path}: field 'population' must list genome keys; {_START_AGAIN}")
    for key, value in state["fitness"].items():
        if not _is_fitness(value):
            raise ValueError(f"{path}: fitness of {key!r} is {value!r}, not a finite number; {_START_AGAIN}")
    if not all(isinstance(entry, dict) for entry in state["history"]):
        raise ValueError(f"{path}: field 'history' must list one mapping per generation; {_START_AGAIN}")
    try:
        np.random.default_rng().bit_generator.state = state["rng"]
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: field 'rng' is not a PCG64 generator state ({err}); {_START_AGAIN}") from None
    return state


def append_evaluation(folder: Path, record: dict[str, Any]) -> None:
    """One JSON line of the evaluation log (ranks may share the file)."""
    append_json_line(folder / LOG_FILE, record, sort_keys=True)


def load_evaluations(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every complete line of the log; errors name the file and the line."""
    path = folder / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        where = f"{path} line {number}"
        if not isinstance(record, dict) or not isinstance(record.get("settings"), str) or not isinstance(
            record.get("key"), str
        ):
            raise ValueError(f"{where}: not an evaluation record; delete that line")
        if not _is_fitness(record.get("fitness")):
            raise ValueError(f"{where}: fitness {record.get('fitness')!r} is not a finite number; delete that line "
                             "to evaluate the candidate again")  # fmt: skip
        records.append((number, record))
    return records


def _strict_loads(text: str) -> Any:
    def refuse(token: str) -> float:
        raise ValueError(f"{token} is not a number JSON allows")

    return json.loads(text, parse_constant=refuse)


def _is_fitness(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_KIND_NAMES = {dict: "a mapping", int: "an integer", list: "a list", (int, float): "a number"}
