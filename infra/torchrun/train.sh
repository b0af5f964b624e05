#!/bin/bash
# Multi-node training with torchrun (TorchElastic): run this on every node.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 infra/torchrun/train.sh \
#       configs/train/dit_wan1.3b_zero2.yaml [extra CLI args]
#
# Lightning detects the TorchElastic environment (RANK, LOCAL_RANK, WORLD_SIZE ...) that torchrun
# sets and joins its rendezvous; --trainer.num_nodes / --trainer.devices must match it.
# --ckpt_path last resumes a restarted job from the shared checkpoint folder (`out:` in the config).
# NNODES, NODE_RANK and MASTER_ADDR are required (one node: NNODES=1 NODE_RANK=0
# MASTER_ADDR=127.0.0.1): a node that silently ran alone would train a different model.
set -euo pipefail

usage="usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST [GPUS=8] [MASTER_PORT=29500] $0 CONFIG.yaml [extra CLI args]"
fail() { echo "train.sh: $1" >&2; echo "$usage" >&2; exit 2; }
CONFIG=${1:-}
[[ -n "$CONFIG" ]] || fail "no config given"
shift
for var in NNODES NODE_RANK MASTER_ADDR; do
  [[ -n "${!var:-}" ]] || fail "$var is not set"
done
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES=$NNODES is not a positive integer"
[[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]] || fail "NODE_RANK=$NODE_RANK is not in [0, NNODES=$NNODES)"
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
GPUS=${GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
cd "$REPO"
[[ -f "$CONFIG" ]] || fail "config $CONFIG not found under $REPO"
[[ -x "$PYTHON" ]] || fail "no Python at $PYTHON (run 'make setup' or set PYTHON)"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}
TRACKING=()
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  TRACKING=(--trainer.logger.init_args.tracking_uri "$MLFLOW_TRACKING_URI")
fi

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$GPUS" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --max_restarts 0 \
  -m training.train fit --config "$CONFIG" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS" --ckpt_path last "${TRACKING[@]}" "$@"
