#!/usr/bin/env bash
# One process (one GPU, or the CPU with `--device cpu`): timm's own train.py with the ConvNN models registered.
set -euo pipefail
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
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
config=$1; data=$2; shift 2
scripts=${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to the folder holding timm\'s train.py}
cmd=("${PYTHON:-python}" -m timm_convnn.run "$scripts/train.py" -c "$config" --data-dir "$data" "$@")
printf '%q ' "${cmd[@]}"; echo
if [[ "${DRY_RUN:-0}" == "1" ]]; then exit 0; fi
exec "${cmd[@]}"
