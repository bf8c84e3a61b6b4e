#!/usr/bin/env bash
# The two EMA warm-up shapes (--ema-warmup-shape ratio | power) on the demo's digits, 3 seeds each, for
# the table in docs/recipes.md: the demo's settings plus an EMA of decay 0.99 with the warm-up and
# RandAugment at timm's m9 (our 27). The runs go one after another (about 3-5 minutes each on 2 CPU cores).
# Prints one line per run, then the mean per shape:
#   SHAPE SEED  top1 (last) ema_top1 (last)  best top1 best ema_top1
# Usage: bash benchmarks/ema_warmup_digits.sh [OUT_DIR]     (default ./ema-warmup-digits)
#        SHAPES="ratio power" SEEDS="0 1 2" bash benchmarks/ema_warmup_digits.sh
set -uo pipefail
OUT=${1:-ema-warmup-digits}
PYTHON=${PYTHON:-python3}
SHAPES=${SHAPES:-ratio power}
SEEDS=${SEEDS:-0 1 2}
mkdir -p "$OUT"
DATA="$OUT/digits"
"$PYTHON" -c "import sys; from xception.tools.demo import write_digits; write_digits(sys.argv[1])" "$DATA" \
  || { echo "could not write the digits to $DATA"; exit 1; }
# the demo's settings (tools/demo.py DEMO_SETTINGS), fp32
BASE=(--data_path "$DATA" --image-size 71 --crop-pct 1 --crop-scale 0.5 1 --no-hflip --epochs 4 -b 32 --lr 0.02
      --momentum 0.9 --wd 5e-5 --warmup-epochs 1 --label-smoothing 0.1 -j 1 --print-freq 50 --no-amp)
EXTRA=(--ema --ema-decay 0.99 --ema-warmup --auto-augment ra --ra-magnitude 27 --ra-num-ops 2)
for shape in $SHAPES; do
  for seed in $SEEDS; do
    run="$OUT/$shape-seed$seed"
    "$PYTHON" -m xception train "${BASE[@]}" "${EXTRA[@]}" --ema-warmup-shape "$shape" --seed "$seed" \
      --output-dir "$run" > "$run.log" 2>&1 || { echo "$shape seed $seed failed: $run.log"; continue; }
    "$PYTHON" - "$run/metrics.csv" "$shape" "$seed" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
last = rows[-1]
print(f"{sys.argv[2]:6s} {sys.argv[3]:>4s}  top1 {float(last['top1']):6.2f}  ema_top1 {float(last['ema_top1']):6.2f}  "
      f"best {max(float(r['top1']) for r in rows):6.2f} {max(float(r['ema_top1']) for r in rows):6.2f}", flush=True)
PY
  done
done
"$PYTHON" - "$OUT" $SHAPES <<'PY'
import csv, glob, os, sys
for shape in sys.argv[2:]:
    last = [list(csv.DictReader(open(f)))[-1] for f in sorted(glob.glob(os.path.join(sys.argv[1], f"{shape}-seed*", "metrics.csv")))]
    if last:
        mean = lambda key: sum(float(r[key]) for r in last) / len(last)
        print(f"{shape:6s} mean of {len(last)}: top1 {mean('top1'):6.2f}  ema_top1 {mean('ema_top1'):6.2f}")
PY
