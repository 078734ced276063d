# Shared by the train_scripts/*.sh launchers (sourced, not run): help, arguments, process count, run.
# The sourcing script defines usage() and then calls `launch_setup "$@"`, which sets: config, data, extra (array).

launch_setup() {
    if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
    if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
    config=$1; data=$2; shift 2
    extra=("$@")
    scripts=${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to the folder holding timm\'s train.py}
    train=("-m" "timm_convnn.run" "$scripts/train.py" -c "$config" --data-dir "$data")
}

default_nproc() {  # processes per node: $NPROC, else the number of GPUs, else 1
    if [[ -n "${NPROC:-}" ]]; then echo "$NPROC"; return; fi
    local n
    n=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    if [[ "$n" -ge 1 ]]; then echo "$n"; else echo 1; fi
}

launch() {  # print the exact command, then run it (unless DRY_RUN=1)
    printf '%q ' "$@"; echo
    if [[ "${DRY_RUN:-0}" == "1" ]]; then exit 0; fi
    exec "$@"
}
