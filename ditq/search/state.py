"""What a search keeps on disk: its state after every generation (atomic JSON) and a JSONL line per evaluation.

`state.json` holds the settings the search was started with, the generation to run next, its population,
the fitness of every genome evaluated so far and the random generator's state: a killed search restarts from
it and ends exactly where an uninterrupted one would. `evaluations.jsonl` gets one line per fitness
evaluation as soon as it is done, so a kill mid-generation loses no finished evaluation either (a torn last
line is ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ditq.atomic import write_text

STATE_FILE = "state.json"
LOG_FILE = "evaluations.jsonl"
STATE_VERSION = 1


def save_state(folder: Path, state: dict[str, Any]) -> None:
    write_text(folder / STATE_FILE, json.dumps({"version": STATE_VERSION, **state}, indent=1) + "\n")


def load_state(folder: Path) -> dict[str, Any] | None:
    """The saved state, None when the folder holds none; errors name the file and the field."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a search state ({err}); delete it to start again") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: field 'version' must be {STATE_VERSION}; delete it to start again")
    for key, kind in (("settings", dict), ("generation", int), ("population", list), ("fitness", dict),
                      ("rng", dict), ("history", list)):  # fmt: skip
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    return state


def append_evaluation(folder: Path, record: dict[str, Any]) -> None:
    """One JSON line, written with a single O_APPEND write (ranks may share the file)."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(folder / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def logged_fitness(folder: Path, settings_hash: str) -> dict[str, float]:
    """key → fitness from the log's complete lines of this search (same settings hash)."""
    path = folder / LOG_FILE
    found: dict[str, float] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(record, dict) and record.get("settings") == settings_hash and "key" in record:
            found[record["key"]] = float(record["fitness"])
    return found
