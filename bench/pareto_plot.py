"""Quality against bits per weight, as a PNG: one point per row, the Pareto frontier drawn through the rows no
other row beats at fewer or equal bits.

Reads a JSON file of rows (a list, or an object with a "rows" list, as `matquant_mix.py` writes), each with
`name`, `bits` and a quality column (`--y`, default `psnr`; higher is better, or `--lower-is-better` for FID);
`kind` (e.g. uniform / searched / schedule) picks the marker. Needs matplotlib (not a ditq dependency).

    python bench/pareto_plot.py bench/results/matquant_mix_cpu.json bench/results/matquant_mix_cpu.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

MARKERS = {"uniform": "o", "searched": "*", "schedule": "s"}


def read_rows(path: Path, y: str) -> list[dict]:
    """The rows of `path`, each checked to name a finite `bits` and `y`; errors name the row."""
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of rows (or an object with one under 'rows')")
    for k, row in enumerate(rows):
        for key in ("name", "bits", y):
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"{path}: row {k} has no {key!r}")
        for key in ("bits", y):
            if isinstance(row[key], bool) or not isinstance(row[key], (int, float)) or not math.isfinite(row[key]):
                raise ValueError(f"{path}: row {k} ({row['name']}): {key}={row[key]!r} is not a finite number")
    return rows


def pareto(rows: list[dict], y: str, higher_is_better: bool = True) -> list[dict]:
    """The rows no other row beats (better or equal quality at fewer or equal bits), by bits."""
    sign = 1 if higher_is_better else -1
    front: list[dict] = []
    for row in sorted(rows, key=lambda r: (r["bits"], -sign * r[y])):
        if not front or sign * row[y] > sign * front[-1][y]:
            front.append(row)
    return front


def plot(rows: list[dict], out: Path, y: str, higher_is_better: bool, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    for kind in sorted({r.get("kind", "") for r in rows}):
        members = [r for r in rows if r.get("kind", "") == kind]
        ax.scatter([r["bits"] for r in members], [r[y] for r in members], marker=MARKERS.get(kind, "^"),
                   s=90 if kind == "searched" else 40, label=kind or "rows", zorder=3)  # fmt: skip
    front = pareto(rows, y, higher_is_better)
    ax.step([r["bits"] for r in front], [r[y] for r in front], where="post", color="gray", lw=1, ls="--",
            label="Pareto frontier", zorder=2)  # fmt: skip
    for r in rows:
        ax.annotate(r["name"], (r["bits"], r[y]), textcoords="offset points", xytext=(4, 3), fontsize=6)
    ax.set_xlabel("bits per weight (codes + scales)")
    ax.set_ylabel(y if higher_is_better else f"{y} (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", type=Path, help="JSON file of rows")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--y", default="psnr", help="the quality column")
    p.add_argument("--lower-is-better", action="store_true", help="for a quality like FID")
    p.add_argument("--title", default=None, help="default: the rows file's name")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("pareto_plot.py: error: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    if args.out.suffix.lower() != ".png":
        print(f"pareto_plot.py: error: {args.out} must end in .png", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.rows, args.y)
    except (OSError, ValueError) as err:
        print(f"pareto_plot.py: error: {err}", file=sys.stderr)
        return 2
    plot(rows, args.out, args.y, not args.lower_is_better, args.title or args.rows.stem)
    front = ", ".join(r["name"] for r in pareto(rows, args.y, not args.lower_is_better))
    print(f"wrote {args.out}; Pareto frontier: {front}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
