#!/usr/bin/env bash
# Fidelity tables for the bundled DiT-MNIST (run on a GPU machine from the repo root; writes under $OUT):
# a guidance sweep of the FP model, then the RTN baseline table every method must beat, at two seeds.
set -euo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
CKPT=${CKPT:-ditq/assets/dit_mnist/dit_mnist_fp16.safetensors}
SAMPLES=${SAMPLES:-2000}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD  # run from the tree: no install, no build isolation (no network there)
for cfg in 1.0 1.5 2.0 3.0; do
  python -m ditq.cli eval --fp "$CKPT" --samples 1000 --steps 50 --cfg $cfg --batch-size 500 --out "$OUT/cfg$cfg" > /dev/null
done
python - "$OUT" <<'PY' | tee "$OUT/cfg_sweep.md"
import json, sys
print("| cfg | FID | class acc | IS | precision | recall |\n|---|---|---|---|---|---|")
for cfg in ("1.0", "1.5", "2.0", "3.0"):
    r = json.load(open(f"{sys.argv[1]}/cfg{cfg}/report.json"))["FP"]
    print(f"| {cfg} | {r['fid']:.2f} | {r['class_acc']:.4f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
PY
for seed in 0 1; do
  python -m ditq.cli eval --fp "$CKPT" --recipe w8a8 --recipe w6a8 --recipe w4a8 --recipe w4a16 --recipe w4a4 \
    --samples "$SAMPLES" --steps 50 --cfg "${CFG:-1.5}" --seed $seed --batch-size 500 --out "$OUT/table_seed$seed"
done
