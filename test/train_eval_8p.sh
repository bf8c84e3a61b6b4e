#!/usr/bin/env bash
# Evaluate a checkpoint on DATA/val with 8 processes (XCEPTION_NPROC sets the count).
# Usage: bash ./test/train_eval_8p.sh --data_path=DIR --resume_pth=CKPT [flags]
# Under SLURM, one task per device (srun starts them; --nproc is then not used):
#   srun --ntasks-per-node=8 --gpus-per-task=1 bash ./test/train_eval_8p.sh --data_path=DIR --resume_pth=CKPT
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
if [ -z "$RESUME_PTH" ]; then
    echo "$(basename "$0"): error: --resume_pth=CKPT is required (the checkpoint to evaluate)" >&2
    exit 2
fi
launch "${XCEPTION_NPROC:-8}" eval --data_path="$DATA_PATH" --resume="$RESUME_PTH" --batch-size=1024 --amp \
    --case-name='Xception_bs{bs}_{np}p_eval' "${PASS[@]}"
