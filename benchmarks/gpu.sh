#!/usr/bin/env bash
# One-GPU benchmark (about 5 minutes): ours vs timm legacy_xception, train and infer, 299 px,
# fp16/bf16 autocast, NCHW and channels_last, eager; plus compiled (both sides) in bf16 channels_last,
# the pre-registered goal's setting; plus our real training loop under torch.cuda.set_sync_debug_mode("warn").
# One JSON object per line goes to $OUT (default gpu.jsonl).
#
# What a run checks for the GPU issue, and where in $OUT:
#   syncs per step   the sync-debug row's "sync_debug": CUDA syncs and host reads of our training loop (fp16,
#                    loss scaler, channels_last), per step, at print steps and outside them (goal: 0 outside)
#   fused SGD        the sync-debug row's "ours_settings": {"optimizer": ...}: the engine's optimizer, fused on CUDA
#   cudnn benchmark  "cudnn_benchmark" in every successful row (autotuning on, as training sets it)
#   failures         a configuration that fails (CUDA out of memory, a bad flag) writes one row
#                    {"mode", "dtype", "settings", "failed": true, "exit_code", "error": its last stderr line}
#                    and the others still run; the script exits 0 if at least one configuration succeeded
#
# Usage: bash benchmarks/gpu.sh [BATCH]       BATCH defaults to 128
# Every setting is an environment variable, so the same script runs small on a CPU (tests/test_bench.py):
#   DEVICE=cpu SIZE=71 DTYPES=float32 COMPILED_DTYPES= SYNC_DTYPES=float32 REPEATS=1 STEPS=1 WARMUP=1 \
#     bash benchmarks/gpu.sh 2
set -uo pipefail  # no -e: one failing configuration must not cost the rows of the others
BATCH=${1:-128}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-299}
DTYPES=${DTYPES:-float16 bfloat16}
COMPILED_DTYPES=${COMPILED_DTYPES-bfloat16}   # compiled runs, channels_last only (each compiles twice)
SYNC_DTYPES=${SYNC_DTYPES-float16}            # sync-debug runs of the training loop; empty: none
REPEATS=${REPEATS:-5}
STEPS=${STEPS:-5}                             # the sync-debug run takes max(20, STEPS x REPEATS) steps
WARMUP=${WARMUP:-3}
OUT=${OUT:-gpu.jsonl}
PYTHON=${PYTHON:-python3}

ERR=$(mktemp) || exit 1  # one configuration's stderr, kept to name its failure
trap 'rm -f "$ERR"' EXIT
succeeded=0
failed=0

json_string() {  # json_string TEXT: TEXT as a JSON string (backslashes and quotes escaped, control characters dropped)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

bench() {  # bench MODE DTYPE FLAGS...: one configuration; its JSON row, or a {"failed": true} row
  local mode=$1 dtype=$2 code last
  shift 2
  "$PYTHON" -m xception bench --mode "$mode" --device "$DEVICE" --image-size "$SIZE" --batch-size "$BATCH" \
    --dtype "$dtype" --repeats "$REPEATS" --steps "$STEPS" --warmup "$WARMUP" --json "$@" 2>"$ERR" | tee -a "$OUT"
  code=${PIPESTATUS[0]}
  cat "$ERR" >&2  # its warnings and errors, shown after it has run
  if [ "$code" -eq 0 ]; then
    succeeded=$((succeeded + 1))
    return
  fi
  failed=$((failed + 1))
  last=$(grep -v '^[[:space:]]*$' "$ERR" | tail -n 1)
  printf '{"mode": %s, "dtype": %s, "settings": %s, "failed": true, "exit_code": %d, "error": %s}\n' \
    "$(json_string "$mode")" "$(json_string "$dtype")" "$(json_string "$*")" "$code" "$(json_string "$last")" \
    | tee -a "$OUT"
  echo "gpu.sh: bench --mode $mode --dtype $dtype $* failed (exit $code); going on" >&2
}

: > "$OUT" || exit 1
for mode in train infer; do
  for dtype in $DTYPES; do
    bench "$mode" "$dtype" --channels-last --timm-channels-last
    bench "$mode" "$dtype" --no-channels-last
  done
  for dtype in $COMPILED_DTYPES; do
    bench "$mode" "$dtype" --channels-last --timm-channels-last --compile --timm-compile
  done
done
for dtype in $SYNC_DTYPES; do
  bench train "$dtype" --channels-last --sync-debug
done
echo "results: $OUT ($succeeded configurations succeeded, $failed failed)"
[ "$succeeded" -gt 0 ]
