#!/usr/bin/env bash
# Several nodes with torchrun (c10d rendezvous): run this same command on every node.
set -euo pipefail
usage() {
    cat <<'TXT'
usage: train_scripts/train_multinode.sh CONFIG DATA_DIR [train.py options ...]

Runs on each node: torchrun --nnodes $NNODES --nproc_per_node $NPROC --node_rank $NODE_RANK
--rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $RDZV_ID
-m timm_convnn.run $TIMM_SCRIPTS_DIR/train.py -c CONFIG --data-dir DATA_DIR ...

environment (rendezvous; SLURM's SLURM_NNODES / SLURM_NODEID are used when set):
  TIMM_SCRIPTS_DIR  folder holding timm's train.py (required)
  MASTER_ADDR       address of the rendezvous host (required)
  MASTER_PORT       its port (default 29500)
  NNODES            number of nodes (default $SLURM_NNODES, else required)
  NODE_RANK         this node's rank (default $SLURM_NODEID, else required)
  NPROC             processes per node (default: GPUs from nvidia-smi, else 1)
  RDZV_ID           job id shared by all nodes (default $SLURM_JOB_ID, else "timm-convnn")
  TORCHRUN          torchrun executable (default: torchrun)
  DRY_RUN=1         print the command, do not run it
TXT
}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
config=$1; data=$2; shift 2
scripts=${TIMM_SCRIPTS_DIR:?set TIMM_SCRIPTS_DIR to the folder holding timm\'s train.py}
master=${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}
nnodes=${NNODES:-${SLURM_NNODES:?set NNODES}}
node_rank=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK}}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
cmd=("${TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc_per_node "$NPROC" --node_rank "$node_rank"
     --rdzv_backend c10d --rdzv_endpoint "$master:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-timm-convnn}}"
     -m timm_convnn.run "$scripts/train.py" -c "$config" --data-dir "$data" "$@")
printf '%q ' "${cmd[@]}"; echo
if [[ "${DRY_RUN:-0}" == "1" ]]; then exit 0; fi
exec "${cmd[@]}"
