"""Atomic writes: a writer killed mid-write leaves the target as it was, and the next write of that target
removes the temporary file it left (and nothing that a live writer or another target owns)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditq import atomic
from ditq.atomic import STALE_AFTER_S, TEMP_NAME, sweep_stale_temporaries, write_text

# atomic.py loaded on its own (standard library only), so the writer starts without importing torch
KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.atomic_path(sys.argv[2]) as tmp:
    tmp.write_bytes(b"half a new checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the old checkpoint")
    with subprocess.Popen([sys.executable, "-c", KILLED_WRITER, atomic.__file__, str(target)],
                          stderr=subprocess.PIPE) as writer:
        _, err = writer.communicate()
    assert writer.returncode == -signal.SIGKILL, err
    assert target.read_bytes() == b"the old checkpoint"
    (left,) = [TEMP_NAME.fullmatch(p.name) for p in tmp_path.iterdir() if p != target]
    assert left["target"] == "model.safetensors" and left["pid"] == str(writer.pid)

    write_text(target, "the new checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert target.read_text() == "the new checkpoint"


def _touch(folder: Path, name: str, age_s: float = 0.0) -> Path:
    path = folder / name
    path.write_bytes(b"partial")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    target = tmp_path / "q.safetensors"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()  # a process that has exited
    dead = _touch(tmp_path, f".q.safetensors.{dead_pid}.k3j_x9ab.tmp")
    old = _touch(tmp_path, ".q.safetensors.a8b7c6d5.tmp", age_s=STALE_AFTER_S + 60)  # an older ditq's, a day old
    kept = [
        _touch(tmp_path, f".q.safetensors.{os.getpid()}.m2n3b4v5.tmp"),  # a live writer (this process)
        _touch(tmp_path, f".q.safetensors.{os.getpid()}.z9y8x7w6.tmp", age_s=60),
        _touch(tmp_path, ".q.safetensors.a8b7c6d6.tmp"),  # an older ditq's, fresh: maybe still writing
        _touch(tmp_path, f".r.safetensors.{dead_pid}.k3j_x9ab.tmp"),  # another target's
        _touch(tmp_path, f".q.safetensors.{dead_pid}.k3j_x9ab.tmp.bak"),  # not a name ditq writes
        _touch(tmp_path, f"q.safetensors.{dead_pid}.k3j_x9ab.tmp"),
    ]
    assert sorted(sweep_stale_temporaries(target)) == sorted([dead, old])
    assert all(p.exists() for p in kept) and not dead.exists() and not old.exists()


def test_temporary_names_carry_the_writer_and_read_back_as_the_target(tmp_path):
    with atomic.atomic_path(tmp_path / "g.png") as tmp:
        match = TEMP_NAME.fullmatch(tmp.name)
        assert match["target"] == "g.png" and match["pid"] == str(os.getpid())
        tmp.write_bytes(b"png")
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
