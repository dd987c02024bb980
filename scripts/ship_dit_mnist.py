"""Turn a training run's fp32 EMA weights into the bundled fp16 DiT-MNIST checkpoint."""

from __future__ import annotations

import argparse

from ditq.train import export_fp16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ema", help="ema.safetensors written by `ditq train`")
    parser.add_argument("dst", help="where to write the fp16 ditq checkpoint")
    args = parser.parse_args()
    print(f"wrote {export_fp16(args.ema, args.dst)}")


if __name__ == "__main__":
    main()
