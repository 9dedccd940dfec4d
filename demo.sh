#!/usr/bin/env bash
# The quick-start job on the built-in demo images (scikit-image's photos; a demo, not a benchmark):
# train a small EDSR for a few minutes, sample the demo validation images, compare with bicubic.
# STEPS=N (default 1000) and OUT=DIR (default runs/demo) change the run; a rerun continues it.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-1000}

python sr_train.py --model bicubic --scale 4 --steps 0 --val-every 0 --out "$OUT/bicubic" --resume auto
# The learning check's short CPU recipe (tests/bench/bench_learning.py): small batches, a high
# rate halved late; the paper's recipe needs far more steps to get anywhere. What this run gives:
# docs/benchmarks.md, "Learning checks".
python sr_train.py --model edsr --scale 4 --data demo --steps "$STEPS" --batch 4 --patch 24 \
  --learning-rate 6e-4 --milestones 0.7 0.8 0.9 --gamma 0.5 --val-every 250 --log-every 50 \
  --out "$OUT/edsr" --resume auto
# --overwrite: a rerun with more STEPS has a new last.pt, whose samples replace the old ones
# (without it sr_sample.py refuses a folder made by another checkpoint); 3 images, seconds.
for m in bicubic edsr; do
  python sr_sample.py --ckpt "$OUT/$m/last.pt" --input demo --n 1 --out "$OUT/samples_$m" --overwrite
done
# LPIPS needs the ImageNet AlexNet weights (see README "Pretrained weights"); skipped here.
python sr_eval.py --hr demo --sr "$OUT/samples_bicubic" --sr "$OUT/samples_edsr" --scale 4 --n 1 \
  --lr "$OUT/samples_edsr/lr" --no-lpips --out "$OUT/results.json"
