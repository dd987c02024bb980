"""`bench/run_fp8_suite.sh`, the GPU measurements in parts: each part it names has a branch, its header and
bench/README.md name the same parts, and an unknown part stops it before any work (checked without a GPU)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "run_fp8_suite.sh"


def parts() -> list[str]:
    (line,) = re.findall(r'^PARTS="([^"]+)"$', SCRIPT.read_text(), flags=re.M)
    return line.split()


def test_every_part_has_one_branch_and_every_branch_is_a_part():
    labels = re.findall(r"^  ([a-z0-9|-]+)\)", SCRIPT.read_text(), flags=re.M)
    branches = [name for label in labels for name in label.split("|")]
    assert sorted(branches) == sorted(parts())


def test_the_header_and_the_bench_readme_name_known_parts():
    header = re.findall(r"^#   .*run_fp8_suite\.sh ([a-z0-9-]+)", SCRIPT.read_text(), flags=re.M)
    (row,) = [line for line in (ROOT / "bench" / "README.md").read_text().splitlines()
              if line.startswith("| `run_fp8_suite.sh`")]  # fmt: skip
    listed = re.findall(r"`([a-z0-9-]+)`", row.split("(", 1)[1].split(")", 1)[0])
    assert set(header) <= set(parts()) and len(header) >= 10
    assert sorted(listed) == sorted(parts())


def test_an_unknown_part_stops_with_the_list_of_parts(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "no-such-part"], env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert "unknown part no-such-part" in run.stderr and " ".join(parts()) in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
