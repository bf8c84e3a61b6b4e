#!/usr/bin/env bash
# One-GPU benchmark (about 5 minutes): ours vs timm legacy_xception, train and infer, 299 px,
# fp16/bf16 autocast, NCHW and channels_last. One JSON object per line goes to $OUT (default gpu.jsonl).
# Usage: bash benchmarks/gpu.sh [BATCH]   (BATCH defaults to 128; DEVICE=cpu with a small BATCH tries it on a CPU)
set -euo pipefail
BATCH=${1:-128}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu.jsonl}
PYTHON=${PYTHON:-python3}
: > "$OUT"
for mode in train infer; do
  for dtype in float16 bfloat16; do
    for layout in --channels-last --no-channels-last; do
      timm_layout=$([ "$layout" = --channels-last ] && echo --timm-channels-last || true)
      "$PYTHON" -m xception bench --mode "$mode" --device "$DEVICE" --image-size 299 --batch-size "$BATCH" \
        --dtype "$dtype" $layout $timm_layout --repeats 5 --steps 5 --warmup 3 --json | tee -a "$OUT"
    done
  done
done
echo "results: $OUT"
