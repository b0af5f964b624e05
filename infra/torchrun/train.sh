#!/bin/bash
# Multi-node training with torchrun (TorchElastic): run this on every node.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 infra/torchrun/train.sh \
#       configs/train/dit_wan1.3b_zero2.yaml [extra CLI args]
#
# Lightning detects the TorchElastic environment (RANK, LOCAL_RANK, WORLD_SIZE ...) that torchrun
# sets and joins its rendezvous; --trainer.num_nodes / --trainer.devices must match it.
# --ckpt_path last resumes a restarted job from the shared checkpoint folder (`out:` in the config).
set -euo pipefail

CONFIG=${1:-configs/train/dit_wan1.3b_zero2.yaml}
shift || true
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
cd "$REPO"

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
