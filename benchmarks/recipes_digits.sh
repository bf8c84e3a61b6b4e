#!/usr/bin/env bash
# Every recipe ingredient end to end on the demo's digits (4 epochs each, the demo's settings), for the
# table in docs/recipes.md. About 3 minutes per row on a 2-core CPU. Prints one line per row:
#   ROW  top1 ema_top1 img/s
# Usage: bash benchmarks/recipes_digits.sh [OUT_DIR]     (default ./recipes-digits)
set -uo pipefail
OUT=${1:-recipes-digits}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
# the demo writes the digits tree (and trains the plain row)
"$PYTHON" -m xception demo --output-dir "$OUT/plain" > "$OUT/plain.log" 2>&1 || { echo "demo failed: $OUT/plain.log"; exit 1; }
DATA="$OUT/plain/digits"
# the demo's settings: 71 px, no flips (a mirrored 2 is not a 2), crops of at least half the image
BASE=(--data_path "$DATA" --image-size 71 --crop-pct 1 --crop-scale 0.5 1 --no-hflip --epochs 4 -b 32 --lr 0.02
      --momentum 0.9 --wd 5e-5 --warmup-epochs 1 --label-smoothing 0.1 -j 1 --seed 0 --print-freq 1000 --no-amp)
row() {  # row NAME FLAGS...
  local name=$1
  shift
  "$PYTHON" -m xception train "${BASE[@]}" --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed: $OUT/$name.log"; return; }
  "$PYTHON" - "$OUT/$name/metrics.csv" "$name" <<'PY'
import csv, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
print(f"{sys.argv[2]:14s} top1 {float(row['top1']):6.2f}  ema_top1 {row.get('ema_top1') or '-':>7}  "
      f"img/s {float(row['images_per_sec']):.1f}")
PY
}
"$PYTHON" - "$OUT/plain/metrics.csv" <<'PY'
import csv, sys
row = list(csv.DictReader(open(sys.argv[1])))[-1]
print(f"{'plain (demo)':14s} top1 {float(row['top1']):6.2f}  ema_top1       -  img/s {float(row['images_per_sec']):.1f}")
PY
row ema --ema --ema-decay 0.99 --ema-warmup
row mixup-cutmix --mixup 0.2 --cutmix 1.0
row randaugment --auto-augment ra --ra-magnitude 9 --ra-num-ops 2
# --recipe modern, adapted: the demo's epochs, batch, LR and warm-up; its other values as they are
row modern --recipe modern --epochs 4 -b 32 --lr 0.02 --warmup-epochs 1
