"""Train the MNIST feature network and write the two bundled evaluation assets.

    .venv/bin/python scripts/make_feature_net.py            # writes into ditq/assets/

Trains ``FeatureNet`` on MNIST test images 0–7999, checks accuracy on 8000–9999 (must be ≥ 98%),
then writes, each atomically (temp file + os.replace):
- ``feature_net.safetensors``: weights, config in the metadata;
- ``mnist_feature_stats.npz``: mu/sigma of the features of all 10,000 images and of the halves
  0–4999 / 5000–9999, the FID between the halves (the real-vs-real floor), and the features of a
  fixed 2,000-image subset for precision/recall.
Deterministic given --seed (same machine and thread count).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ditq.data import load_mnist, to_model_space
from ditq.eval.features import (
    assets_dir,
    features_and_logits,
    file_sha256,
    load_feature_net,
    save_feature_net,
    save_real_stats,
    train_feature_net,
)
from ditq.eval.metrics import class_accuracy, feature_stats, fid_from_stats

N_TRAIN = 8000
MIN_ACCURACY = 0.98
N_FEATS = 2000  # real features kept for precision/recall; keeps the npz well under 2 MB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=assets_dir())
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX folder (default: bundled)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels = load_mnist(args.data_dir)
    x = to_model_space(images)  # (10000, 1, 32, 32)
    t0 = time.perf_counter()
    net = train_feature_net(
        x[:N_TRAIN],
        labels[:N_TRAIN],
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
        progress=not args.no_progress,
    )
    train_s = time.perf_counter() - t0
    feats, logits = features_and_logits(net, x)
    acc = class_accuracy(logits[N_TRAIN:], labels[N_TRAIN:])
    print(f"trained in {train_s:.1f} s; held-out accuracy (images {N_TRAIN}-{len(x) - 1}): {acc:.4f}")
    if acc < MIN_ACCURACY:
        print(f"accuracy below {MIN_ACCURACY:.2f}; nothing written")
        return 1

    weights_path = args.out_dir / "feature_net.safetensors"
    info = {
        "train_images": f"0-{N_TRAIN - 1}",
        "heldout_accuracy": round(acc, 5),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }
    save_feature_net(net, weights_path, extra=info)
    # Statistics come from the weights as written, so the two files agree exactly.
    feats, logits = features_and_logits(load_feature_net(weights_path), x)

    half = len(x) // 2
    mu, sigma = feature_stats(feats)
    mu0, sigma0 = feature_stats(feats[:half])
    mu1, sigma1 = feature_stats(feats[half:])
    floor = fid_from_stats(mu0, sigma0, mu1, sigma1)
    # The halves differ in writers (NIST SD-3 vs SD-1), so also record a random 5000/5000 split:
    # that one is the pure sampling-noise floor at n = 5000.
    perm = np.random.default_rng(args.seed).permutation(len(x))
    floor_random = fid_from_stats(*feature_stats(feats[perm[:half]]), *feature_stats(feats[perm[half:]]))
    feat_indices = np.sort(np.random.default_rng(args.seed + 1).permutation(len(x))[:N_FEATS])
    stats_path = args.out_dir / "mnist_feature_stats.npz"
    save_real_stats(
        stats_path,
        {
            "mu": mu,
            "sigma": sigma,
            "mu_half0": mu0,
            "sigma_half0": sigma0,
            "mu_half1": mu1,
            "sigma_half1": sigma1,
            "fid_floor": np.array(floor),
            "fid_floor_random_split": np.array(floor_random),
            "feats": feats[feat_indices].astype(np.float32),
            "feats_indices": feat_indices.astype(np.int64),
            "heldout_accuracy": np.array(acc),
            "feature_net_sha256": np.array(file_sha256(weights_path)),
        },
    )
    print(f"real-vs-real FID floor (images 0-{half - 1} vs {half}-{len(x) - 1}): {floor:.4f}")
    print(f"real-vs-real FID, random {half}/{len(x) - half} split: {floor_random:.4f}")
    print(f"wrote {weights_path} ({weights_path.stat().st_size / 1e3:.0f} kB)")
    print(f"wrote {stats_path} ({stats_path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
