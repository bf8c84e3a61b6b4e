#!/usr/bin/env bash
# Seed recipe on one device: 150 epochs, batch 128, lr 0.1. Usage: bash ./test/train_full_1p.sh --data_path=DIR [flags]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
launch 1 train --data_path="$DATA_PATH" --epochs=150 --batch-size=128 --lr=0.1 \
    --case-name='Xception_bs{bs}_{np}p_acc' "${PASS[@]}"
