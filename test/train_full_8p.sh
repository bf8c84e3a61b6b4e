#!/usr/bin/env bash
# Seed recipe on one node of 8 devices: 150 epochs, global batch 1024, lr 0.8, label smoothing 0.1,
# 5 warm-up epochs then cosine, AMP. XCEPTION_NPROC sets the process count (default 8).
# Usage: bash ./test/train_full_8p.sh --data_path=DIR [flags]
# Under SLURM, one task per device (srun starts them; --nproc is then not used):
#   srun --ntasks-per-node=8 --gpus-per-task=1 bash ./test/train_full_8p.sh --data_path=DIR [flags]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
launch "${XCEPTION_NPROC:-8}" train --data_path="$DATA_PATH" --epochs=150 --batch-size=1024 --lr=0.8 \
    --label-smoothing=0.1 --warmup-epochs=5 --amp --seed=49 \
    --case-name='Xception_bs{bs}_{np}p_acc' "${PASS[@]}"
