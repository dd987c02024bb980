"""Peak host memory of calibrating DiT-XL/2-size random weights (docs/results/calibration_memory/).

Prints one JSON line: the process's resident memory after building the model, its peak during
`calibrate`, and the bytes the returned calibration data holds. Run it against another checkout of ditq
with `PYTHONPATH=<checkout>` to compare (the script only uses `calibrate`'s long-standing arguments).
Random DiT-XL/2 weights with the adaLN-Zero init give zero outputs; memory does not depend on that.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import ditq
from ditq.calib import calibrate
from ditq.models import create


def rss_mib() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2048, help="rows_per_layer")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create(args.model).eval()
    after_build = rss_mib()
    start = time.perf_counter()
    calib = calibrate(model, n_samples=args.samples, steps=args.steps, rows_per_layer=args.rows)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    held = sum(
        t.numel() * t.element_size()
        for kind in ("absmax", "step_absmax", "inputs", "input_steps")
        for t in getattr(calib, kind, {}).values()
    )
    print(json.dumps({
        "ditq": ditq.__file__, "model": args.model, "n_samples": args.samples, "steps": args.steps,
        "rows_per_layer": args.rows, "rss_after_build_mib": round(after_build), "peak_rss_mib": round(peak),
        "peak_minus_model_mib": round(peak - after_build), "calib_data_mib": round(held / 2**20),
        "calibrate_s": round(seconds, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
