#!/usr/bin/env bash
# One process (one GPU, or the CPU with `--device cpu`): timm's own train.py with the ConvNN models registered.
set -euo pipefail
# shellcheck source=train_scripts/_common.sh
source "$(dirname "$0")/_common.sh"
usage() {
    cat <<'TXT'
usage: train_scripts/train_single.sh CONFIG DATA_DIR [train.py options ...]

Runs timm's train.py (found in $TIMM_SCRIPTS_DIR; timm ships it only in its git repository) through
`python -m timm_convnn.run`, with CONFIG as train.py's -c YAML and DATA_DIR as --data-dir. Extra options go to
train.py and override the config (e.g. --device cpu --epochs 1 --output runs).

environment:
  TIMM_SCRIPTS_DIR  folder holding timm's train.py (required)
  PYTHON            interpreter (default: python)
  DRY_RUN=1         print the command, do not run it
TXT
}
launch_setup "$@"
# (${extra[@]+...}: bash < 4.4, macOS's /bin/bash, calls an empty array unbound under set -u)
launch "${PYTHON:-python}" "${train[@]}" ${extra[@]+"${extra[@]}"}
