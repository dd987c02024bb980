"""Turn a training run's EMA weights into the bundled fp16 DiT-MNIST checkpoint (ditq format)."""

from __future__ import annotations

import argparse

import torch

import ditq
from ditq.models import build
from ditq.training.checkpoint import read_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ema", help="ema.safetensors written by `ditq train`")
    parser.add_argument("dst", help="where to write the fp16 ditq checkpoint")
    args = parser.parse_args()
    tensors, header = read_weights(args.ema)
    model = build(header["arch"], header["config"])
    model.load_state_dict(tensors, strict=True)
    model = model.to(torch.float16).eval()
    ditq.save(model, args.dst)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {n_params:,} parameters in fp16")


if __name__ == "__main__":
    main()
