#!/usr/bin/env bash
# Throughput on one node of 8 devices: one short epoch of the 8p recipe. XCEPTION_NPROC sets the count (default 8).
# Usage: bash ./test/train_performance_8p.sh --data_path=DIR [flags]
# Under SLURM, one task per device (srun starts them; --nproc is then not used):
#   srun --ntasks-per-node=8 --gpus-per-task=1 bash ./test/train_performance_8p.sh --data_path=DIR [flags]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
launch "${XCEPTION_NPROC:-8}" train --data_path="$DATA_PATH" --epochs=1 --steps-per-epoch=500 --batch-size=1024 \
    --lr=0.8 --label-smoothing=0.1 --warmup-epochs=5 --amp --seed=49 \
    --case-name='Xception_bs{bs}_{np}p_perf' "${PASS[@]}"
