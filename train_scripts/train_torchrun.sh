#!/usr/bin/env bash
# One node, N processes (one per GPU) with torchrun: timm's own train.py with the ConvNN models registered.
set -euo pipefail
# shellcheck source=train_scripts/_common.sh
source "$(dirname "$0")/_common.sh"
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
launch_setup "$@"
# (${extra[@]+...}: bash < 4.4, macOS's /bin/bash, calls an empty array unbound under set -u)
launch "${TORCHRUN:-torchrun}" --standalone --nproc_per_node "$(default_nproc)" "${train[@]}" ${extra[@]+"${extra[@]}"}
