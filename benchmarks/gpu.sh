#!/usr/bin/env bash
# One-GPU benchmark (about 5 minutes): ours vs timm legacy_xception, train and infer, 299 px,
# fp16/bf16 autocast, NCHW and channels_last, eager; plus compiled (both sides) in bf16 channels_last,
# the pre-registered goal's setting. One JSON object per line goes to $OUT (default gpu.jsonl).
#
# Usage: bash benchmarks/gpu.sh [BATCH]       BATCH defaults to 128
# Every setting is an environment variable, so the same script runs small on a CPU (tests/test_bench.py):
#   DEVICE=cpu SIZE=71 DTYPES=float32 COMPILED_DTYPES= REPEATS=1 STEPS=1 WARMUP=1 bash benchmarks/gpu.sh 2
set -euo pipefail
BATCH=${1:-128}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-299}
DTYPES=${DTYPES:-float16 bfloat16}
COMPILED_DTYPES=${COMPILED_DTYPES-bfloat16}   # compiled runs, channels_last only (each compiles twice)
REPEATS=${REPEATS:-5}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-3}
OUT=${OUT:-gpu.jsonl}
PYTHON=${PYTHON:-python3}

bench() {  # bench MODE DTYPE LAYOUT_FLAGS...
  local mode=$1 dtype=$2
  shift 2
  "$PYTHON" -m xception bench --mode "$mode" --device "$DEVICE" --image-size "$SIZE" --batch-size "$BATCH" \
    --dtype "$dtype" --repeats "$REPEATS" --steps "$STEPS" --warmup "$WARMUP" --json "$@" | tee -a "$OUT"
}

: > "$OUT"
for mode in train infer; do
  for dtype in $DTYPES; do
    bench "$mode" "$dtype" --channels-last --timm-channels-last
    bench "$mode" "$dtype" --no-channels-last
  done
  for dtype in $COMPILED_DTYPES; do
    bench "$mode" "$dtype" --channels-last --timm-channels-last --compile --timm-compile
  done
done
echo "results: $OUT"
