#!/usr/bin/env bash
# Several nodes with torchrun (c10d rendezvous): run this same command on every node.
set -euo pipefail
# shellcheck source=train_scripts/_common.sh
source "$(dirname "$0")/_common.sh"
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
launch_setup "$@"
master=${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}
nnodes=${NNODES:-${SLURM_NNODES:-}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-}}
[ -n "$nnodes" ] || { echo "$(basename "$0"): set NNODES (the number of nodes; SLURM_NNODES under SLURM)" >&2; exit 1; }
[ -n "$node_rank" ] || { echo "$(basename "$0"): set NODE_RANK (this node's rank; SLURM_NODEID under SLURM)" >&2
                         exit 1; }
# (${extra[@]+...}: bash < 4.4, macOS's /bin/bash, calls an empty array unbound under set -u)
launch "${TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc_per_node "$(default_nproc)" --node_rank "$node_rank" \
    --rdzv_backend c10d --rdzv_endpoint "$master:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-timm-convnn}}" "${train[@]}" ${extra[@]+"${extra[@]}"}
