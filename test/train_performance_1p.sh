#!/usr/bin/env bash
# Throughput on one device: one short epoch of the 1p recipe. Usage: bash ./test/train_performance_1p.sh --data_path=DIR [flags]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
launch 1 train --data_path="$DATA_PATH" --epochs=1 --steps-per-epoch=500 --batch-size=128 --lr=0.1 \
    --case-name='Xception_bs{bs}_{np}p_perf' "${PASS[@]}"
