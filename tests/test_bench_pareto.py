"""bench/pareto_plot.py: which rows make the frontier, and rows files it refuses (matplotlib is not needed)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))  # as `python bench/...` imports siblings
    return importlib.import_module("pareto_plot")


ROWS = [
    {"name": "int2", "bits": 2.1, "psnr": 15.0},
    {"name": "mix", "bits": 3.0, "psnr": 18.0},
    {"name": "worse mix", "bits": 3.0, "psnr": 16.0},  # same bits, lower quality
    {"name": "int3", "bits": 4.1, "psnr": 17.0},  # more bits than "mix", lower quality
    {"name": "int4", "bits": 4.1, "psnr": 24.0},
    {"name": "int6", "bits": 8.1, "psnr": 24.0},  # more bits, no better
    {"name": "int8", "bits": 8.1, "psnr": 40.0},
]


def test_the_frontier_keeps_the_rows_nothing_beats(bench):
    assert [r["name"] for r in bench.pareto(ROWS, "psnr")] == ["int2", "mix", "int4", "int8"]
    fid = [{"name": n, "bits": b, "fid": f} for n, b, f in [("a", 2, 30.0), ("b", 3, 31.0), ("c", 4, 10.0)]]
    assert [r["name"] for r in bench.pareto(fid, "fid", higher_is_better=False)] == ["a", "c"]


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "non-empty list"),
        ({"rows": [{"name": "a", "bits": 2}]}, "row 0 has no 'psnr'"),
        ([{"name": "a", "bits": 2, "psnr": 10}, {"name": "b", "bits": None, "psnr": 3}], r"row 1 \(b\): bits=None"),
        ([{"name": "a", "bits": 2, "psnr": True}], "psnr=True is not a finite number"),
    ],
)
def test_bad_rows_are_named(bench, tmp_path, data, message):
    (tmp_path / "rows.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        bench.read_rows(tmp_path / "rows.json", "psnr")
