#!/usr/bin/env bash
# Train the bundled DiT-MNIST on one GPU (run on the device machine from the repo root; writes under $OUT).
# 1) a 300-step probe measures steps/s; 2) the real run gets as many thousand steps as fit in TRAIN_SECONDS.
set -euo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD  # run from the tree: no install, no build isolation (no network there)
python - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("gpu", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
COMMON="--model DiT-MNIST --batch-size 256 --lr 3e-4 --warmup-steps 500 --ema-decay 0.9995 --seed 0 --no-progress"
python -m ditq.train $COMMON --steps 300 --log-every 100 --ckpt-every 300 --out runs/probe > "$OUT/probe.txt" 2>&1
RATE=$(python -c "import json;r=[json.loads(l) for l in open('runs/probe/log.jsonl')];print(r[-1]['steps_per_s'])")
STEPS=$(python -c "print(max(2000, min(40000, int($RATE*$TRAIN_SECONDS/1000)*1000)))")
echo "probe: $RATE steps/s -> training $STEPS steps" | tee -a "$OUT/env.txt"
CMD="python -m ditq.train $COMMON --steps $STEPS --log-every 200 --ckpt-every 5000 --out runs/dit-mnist"
echo "$CMD" > "$OUT/train_command.txt"
$CMD > "$OUT/train_stdout.txt" 2>&1
cp runs/dit-mnist/log.jsonl "$OUT/train_log.jsonl"
python scripts/ship_dit_mnist.py runs/dit-mnist/ema.safetensors "$OUT/dit_mnist_fp16.safetensors"
