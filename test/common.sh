# Shared by the seed-compatible launch scripts: parse --data_path (and --resume_pth), pass every other
# flag through to the CLI unchanged. Later flags win, so pass-through flags override the recipe.
set -euo pipefail

PYTHON=${PYTHON:-python3}
DATA_PATH=""
RESUME_PTH=""
PASS=()

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --data_path=*|--data-path=*) DATA_PATH="${1#*=}" ;;
            --data_path|--data-path) DATA_PATH="${2:-}"; shift ;;
            --resume_pth=*) RESUME_PTH="${1#*=}" ;;
            --resume_pth) RESUME_PTH="${2:-}"; shift ;;
            *) PASS+=("$1") ;;
        esac
        shift
    done
    if [ -z "$DATA_PATH" ]; then
        echo "$(basename "$0"): error: --data_path=DIR is required (the folder holding train/ and val/)" >&2
        exit 2
    fi
}

# Run `xception ARGS...` as NPROC processes on this node (the CLI starts them through torchrun).
# XCEPTION_NPROC (default: the script's own, 8 for the 8p scripts) sets the count, e.g. 2 on a small CPU box.
launch() {
    local nproc="$1"; shift
    "$PYTHON" -m xception "$@" --nproc="$nproc"
}
