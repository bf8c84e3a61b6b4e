#!/usr/bin/env bash
# The INT8 figures of docs/performance.md: accuracy trials on the demo digits (each calibration method x
# per-channel/per-tensor weights x layers kept fp32), then fp32 ONNX vs INT8 ONNX vs our PyTorch model at
# SIZE px, batch BATCH, in one `xception bench --mode infer --onnx` run.
#   CKPT=xception-demo/model_best.pth.tar DATA=xception-demo/digits bash benchmarks/int8.sh
# ACCURACY=0 skips the trials (18 exports, each evaluating fp32 and int8 on DATA's val split).
set -euo pipefail
PY=${PYTHON:-python}
CKPT=${CKPT:-xception-demo/model_best.pth.tar}
DATA=${DATA:-xception-demo/digits}
OUT=${OUT:-int8-bench}
SIZE=${SIZE:-299}
BATCH=${BATCH:-16}
REPEATS=${REPEATS:-5}
mkdir -p "$OUT"

if [ "${ACCURACY:-1}" = 1 ]; then
    for method in minmax entropy percentile; do
        for weights in per-channel per-tensor; do
            for keep in none first last first,last; do
                file="$OUT/$method-$weights-${keep/,/-}.onnx"
                rm -f "$file"
                echo "== $method, $weights weights, kept fp32: $keep"
                $PY -m xception export --weights "$CKPT" --format onnx --out "$file" --int8 --calibration "$DATA" \
                    --calibration-method "$method" $([ "$weights" = per-tensor ] && echo --per-tensor) \
                    --int8-exclude "$keep" --max-drop 100 | grep "int8: top-1"
            done
        done
    done
fi

# Speed: the graphs at SIZE px (speed does not depend on the trained values, so a few calibration images do)
rm -f "$OUT/fp32-$SIZE.onnx" "$OUT"/int8-*-"$SIZE".onnx
$PY -m xception export --weights "$CKPT" --format onnx --out "$OUT/fp32-$SIZE.onnx" --image-size "$SIZE"
$PY - "$OUT/fp32-$SIZE.onnx" "$OUT" "$SIZE" <<'PYEOF'
import sys
import torch
from xception.tools.quantize import quantize
fp32, out, size = sys.argv[1], sys.argv[2], sys.argv[3]
images = torch.randn(16, 3, int(size), int(size)).clamp(-1, 1)
for keep in ("none", "first,last"):
    quantize(fp32, f"{out}/int8-{keep.replace(',', '-')}-{size}.onnx", images, exclude=keep)
PYEOF
$PY -m xception bench --mode infer --image-size "$SIZE" -b "$BATCH" --repeats "$REPEATS" \
    --onnx "$OUT/fp32-$SIZE.onnx" "$OUT/int8-none-$SIZE.onnx" "$OUT/int8-first-last-$SIZE.onnx"

# The same graphs interleaved, one batch each per round, so that a shared machine's load drift cancels in
# each round's ratio (the table of docs/performance.md; ROUNDS rounds after one warm-up round).
$PY - "$OUT" "$SIZE" "$BATCH" "${ROUNDS:-4}" <<'PYEOF'
import json, statistics, sys, time
import onnxruntime as ort
import torch
from xception.model.deploy import fold_batchnorm
from xception.model.family import build_arch
out, size, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
options.intra_op_num_threads = torch.get_num_threads()
torch.manual_seed(0)
x = torch.randn(batch, 3, size, size)
net = fold_batchnorm(build_arch("xception", num_classes=1000).eval()).to(memory_format=torch.channels_last)
sides = {}
for name in ("fp32", "int8-first-last"):
    session = ort.InferenceSession(f"{out}/{name}-{size}.onnx", options, providers=["CPUExecutionProvider"])
    sides[name] = lambda s=session: s.run(None, {"input": x.numpy()})
sides["ours"] = lambda: net(x.contiguous(memory_format=torch.channels_last))
rows = []
with torch.inference_mode():
    for r in range(rounds + 1):
        row = {}
        for name, run in sides.items():
            t0 = time.perf_counter()
            run()
            row[name] = batch / (time.perf_counter() - t0)
        if r:  # round 0 warms up
            rows.append(row)
            print(json.dumps(row))
ratio = lambda a, b: statistics.median(row[a] / row[b] for row in rows)
print(f"median img/s: " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.3f}" for k in sides))
print(f"median per-round ratios: int8/fp32 {ratio('int8-first-last', 'fp32'):.3f}, "
      f"fp32/ours {ratio('fp32', 'ours'):.3f}, int8/ours {ratio('int8-first-last', 'ours'):.3f}")
PYEOF
