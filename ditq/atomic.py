"""Atomic file writes: write beside the target, flush to disk, rename. Readers never see half a file.

The temporary file is `.<name>.<pid>.<random>.tmp` beside the target. A writer killed before the rename
(SIGKILL, power loss) leaves it behind; the next write of the same target removes those whose writer is
gone (its pid no longer runs here) or that are older than a day (another host's, or an older ditq's
`.<name>.<random>.tmp`), and never touches another file.

`check_output_file` / `check_output_dir` prove before long work that such a write will find a folder that takes
it (a real probe file: permission bits do not tell), and create nothing.

JSON is written strictly: NaN and ±Infinity, which `json.dumps` would write as the non-standard `NaN` and
`Infinity` that other readers refuse, are an error naming the file and where the value sits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("ditq")

STALE_AFTER_S = 24 * 3600  # a temporary file untouched this long has no live writer
_RANDOM = r"[a-z0-9_]+"  # what tempfile.mkstemp puts between prefix and suffix
TEMP_NAME = re.compile(rf"\.(?P<target>[^/\\\s'\"]+?)\.(?:(?P<pid>\d+)\.)?{_RANDOM}\.tmp\b")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the user's usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json_text(data, what=str(path), indent=indent) + "\n")


def append_json_line(path: str | os.PathLike, record: Any, **options: Any) -> None:
    """`record` as one strict JSON line appended with a single O_APPEND write: processes that share the file
    (ranks) never interleave within a line."""
    line = (json_text(record, what=str(path), **options) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def json_text(data: Any, *, what: str, **options: Any) -> str:
    """`json.dumps(data, **options)` refusing NaN and ±Infinity: the ValueError names `what` and the value."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError as err:
        where = _non_finite(data, "")
        if where is None:
            raise
        raise ValueError(f"{what}: {where} is not a finite number (JSON has no NaN or Infinity)") from err


def _non_finite(data: Any, where: str) -> str | None:
    """`key.path=value` of the first NaN or ±Infinity in `data`, None if there is none."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'}={data}"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        step = f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"
        found = _non_finite(value, f"{where}{step}".lstrip("."))
        if found is not None:
            return found
    return None


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted write of `path` left beside it; returns what was removed."""
    path = Path(path)
    own = re.compile(rf"\.{re.escape(path.name)}\.(?:(?P<pid>\d+)\.)?{_RANDOM}\.tmp")
    try:
        candidates = [entry for entry in os.scandir(path.parent) if own.fullmatch(entry.name)]
    except OSError:
        return []
    removed = []
    for entry in candidates:
        pid = own.fullmatch(entry.name)["pid"]
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
            live = age < STALE_AFTER_S and (pid is None or _running(int(pid)))
            if live or not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove
            continue
        log.info("removed %s, left by an interrupted write of %s", entry.path, path)
        removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no pid can be: keep the file
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- paths checked before the work: the writes above will succeed, nothing is created ------------------


def check_output_file(path: Path, flag: str, suffix: str) -> None:
    """Refuse a file path that cannot be written: another extension than `suffix`, a directory, a folder
    that cannot be created or written into."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a {suffix} file path")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: give a {suffix} file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} is not writable")
    _check_folder(path.parent, path, flag)


def check_output_dir(path: Path, flag: str, files: tuple[str, ...] = ()) -> None:
    """Refuse a folder path that cannot be created or written into, or where one of the `files` it will
    receive is a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{flag} {path}: {path / name} is a directory; the command writes a file there")
    _check_folder(path, path, flag)


def _check_folder(folder: Path, path: Path, flag: str) -> None:
    """The nearest existing folder at or above `folder` must take a new file (the rest is created).

    Tried for real with an unnamed temporary file: permission bits do not tell (root passes them, and
    /proc or a read-only mount refuse what they allow)."""
    for existing in (folder.absolute(), *folder.absolute().parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
            try:
                with tempfile.TemporaryFile(dir=existing):
                    pass
            except OSError as err:
                raise ValueError(f"{flag} {path}: cannot write into folder {existing} "
                                 f"({err.strerror or err})") from None
            return
