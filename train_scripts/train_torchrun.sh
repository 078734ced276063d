#!/usr/bin/env bash
# One node, N processes (one per GPU) with torchrun: timm's own train.py with the ConvNN models registered.
set -euo pipefail
usage() {
    cat <<'TXT'
usage: train_scripts/train_torchrun.sh CONFIG DATA_DIR [train.py options ...]

Runs `torchrun --standalone --nproc_per_node $NPROC -m timm_convnn.run $TIMM_SCRIPTS_DIR/train.py -c CONFIG
--data-dir DATA_DIR ...`. train.py sets up DistributedDataParallel itself from torchrun's environment.

environment:
  TIMM_SCRIPTS_DIR  folder holding timm's train.py (required)
  NPROC             processes on this node (default: number of GPUs from nvidia-smi, else 1)
  TORCHRUN          torchrun executable (default: torchrun)
  DRY_RUN=1         print the command, do not run it
TXT
}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
config=$1; data=$2; shift 2
scripts=${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to the folder holding timm\'s train.py}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
cmd=("${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$NPROC"
     -m timm_convnn.run "$scripts/train.py" -c "$config" --data-dir "$data" "$@")
printf '%q ' "${cmd[@]}"; echo
if [[ "${DRY_RUN:-0}" == "1" ]]; then exit 0; fi
exec "${cmd[@]}"
