#!/usr/bin/env bash
# From a bucket to a served model, on the team's tracking server: the commands of docs/infra.md's
# walk-through, in order, at the tiny_cpu recipe's shape (a few steps of each training).
#
#   make services && eval "$(python infra/services/services.py env --root outputs/services)"
#   infra/services/walkthrough.sh outputs/walkthrough
#
# Needs: the stack's environment (MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY: what `services.py env` prints) and the project's environment on PATH
# (`python`, `expportrait`). Steps:
#   1. the recipe's configs            expportrait recipe tiny_cpu --out WORK/recipe
#   2. a small synthetic corpus        expportrait synth corpus --out WORK/corpus
#   3. the preprocessing job           python -m pipelines.preprocess ... --output s3://data/...
#   4. the transfer module, the codec's latent statistics and the generator, reading the
#      bucket and logging to the server (python -m training.train fit ...)
#   5. register (@candidate), evaluate (self), promote (@champion, gate_tiny)
#   6. a clean virtualenv from the champion's own requirements (infra/services/serving_venv.py)
#      runs `mlflow models serve -m models:/expportrait@champion` from a folder where the
#      repository is not importable; a POST with a clip as the source and another as the driver
#      comes back as an mp4 (WORK/answer.mp4).
# Each step's JSON line goes to WORK/steps.jsonl; the last line printed is a JSON summary.
set -euo pipefail

WORK=${1:?usage: infra/services/walkthrough.sh WORK_DIR}
PREFIX=${WALKTHROUGH_PREFIX:-s3://data/walkthrough-$(date +%s)}
STEPS=${WALKTHROUGH_STEPS:-6}                 # generator optimizer steps (the transfer module: 1 epoch)
: "${MLFLOW_TRACKING_URI:?set the stack's environment: eval \"\$(python infra/services/services.py env)\"}"
: "${AWS_ENDPOINT_URL:?set the stack's environment: eval \"\$(python infra/services/services.py env)\"}"
# the registry is the tracking server, as `expportrait register/promote` use it; MLflow's own CLI
# (`mlflow artifacts download`, `mlflow models serve`) would follow a stray $MLFLOW_REGISTRY_URI
export MLFLOW_REGISTRY_URI="$MLFLOW_TRACKING_URI"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
: > "$WORK/steps.jsonl"

say() { echo "[walkthrough $(date +%H:%M:%S)] $*" >&2; }
# run a command and keep its log in WORK/NAME.log; on failure show its end and stop
logged() {
  local name=$1; shift
  say "$name: $*"
  if ! "$@" > "$WORK/$name.log" 2>&1; then
    say "$name failed; the end of $WORK/$name.log:"; tail -40 "$WORK/$name.log" >&2; exit 1
  fi
}
# the same, then append its last line (its JSON) to steps.jsonl and print it
step() {
  logged "$@"
  tail -1 "$WORK/$1.log" | tee -a "$WORK/steps.jsonl"
}
field() { python -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# 1-3: recipe configs, corpus, the preprocessing job into the bucket
step recipe expportrait recipe tiny_cpu --out "$WORK/recipe" > /dev/null
step corpus expportrait synth corpus --out "$WORK/corpus" --identities 4 --clips-per-identity 1 --frames 24 \
  --size 128 > /dev/null
step preprocess python -m pipelines.preprocess --config "$WORK/recipe/preprocess.yaml" \
  --input "$WORK/corpus/manifest.parquet" --output "$PREFIX/pre" --no-progress > /dev/null

# 4: the trainings read the bucket and log to the server (MLFLOW_TRACKING_URI)
transfer=$(step transfer python -m training.train fit --config "$WORK/recipe/transfer.yaml" \
  --data.init_args.root "$PREFIX/pre" --out "$WORK/runs/transfer" --trainer.max_epochs 1 \
  --trainer.enable_progress_bar false)
step codec python -m training.tasks.generator codec --kind space_to_depth --shards "$PREFIX/pre" \
  --out "$WORK/codec" --frames 5 --frame-stride 4 --size 32 > /dev/null
generator=$(step generator python -m training.train fit --config "$WORK/recipe/generator.yaml" \
  --data.init_args.root "$PREFIX/pre" --model.init_args.codec "$WORK/codec" --out "$WORK/runs/generator" \
  --trainer.max_steps "$STEPS" --trainer.enable_progress_bar false)

# 5: register, evaluate, promote through the gate
registered=$(step register expportrait register --run "$(field "$generator" run_id)" \
  --transfer-run "$(field "$transfer" run_id)" --name expportrait --alias candidate)
version=$(field "$registered" version)
step evaluate expportrait evaluate --model "models:/expportrait/$version" --protocol self \
  --data "$WORK/corpus" --out "$WORK/eval" --max-pairs 1 --max-frames 8 --no-motion > /dev/null
step promote expportrait promote --name expportrait --version "$version" --alias champion \
  --gate configs/registry/gate_tiny.yaml > /dev/null

# 6: serve the champion from a clean virtualenv, outside the repository, and POST to it
logged download mlflow artifacts download -u models:/expportrait@champion -d "$WORK/model"
venv_line=$(step venv python infra/services/serving_venv.py "$WORK/model")
VENV=$(field "$venv_line" venv)
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/elsewhere"
say "serving models:/expportrait@champion on 127.0.0.1:$PORT from $VENV"
(cd "$WORK/elsewhere" && exec env -u PYTHONPATH -u VIRTUAL_ENV PATH="$VENV/bin:$PATH" CUDA_VISIBLE_DEVICES= \
   OMP_NUM_THREADS=1 setsid "$VENV/bin/mlflow" models serve -m models:/expportrait@champion \
   --env-manager local -h 127.0.0.1 -p "$PORT" -w 1 > "$WORK/serve.log" 2>&1) &
SERVER=$!
stop_server() { kill -TERM -- "-$SERVER" 2>/dev/null || kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop_server EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/ping" > /dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { say "the server stopped:"; tail -40 "$WORK/serve.log" >&2; exit 1; }
  sleep 2
done
clips=("$WORK"/corpus/clips/*.mp4)
python - "${clips[0]}" "${clips[1]}" > "$WORK/request.json" <<'EOF'
import base64, json, sys
b64 = lambda p: base64.b64encode(open(p, "rb").read()).decode()
print(json.dumps({"dataframe_split": {"columns": ["source", "driving"], "data": [[b64(sys.argv[1]), b64(sys.argv[2])]]},
                  "params": {"steps": 1, "seed": 3}}))
EOF
say "POST /invocations (source ${clips[0]##*/}, driving ${clips[1]##*/})"
curl -sf -m 900 -H 'Content-Type: application/json' --data @"$WORK/request.json" \
  "http://127.0.0.1:$PORT/invocations" > "$WORK/answer.json"
stop_server; trap - EXIT
python - "$WORK" "$version" "$PREFIX" <<'EOF'
import base64, json, sys
from pathlib import Path
work, version, prefix = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
row = json.loads((work / "answer.json").read_text())["predictions"][0]
if row["status"] != "ok":
    print(json.dumps({"ok": False, "status": row["status"], "message": row["message"]}))
    sys.exit(1)
(work / "answer.mp4").write_bytes(base64.b64decode(row["video"]))
print(json.dumps({"ok": True, "version": int(version), "shards": f"{prefix}/pre", "answer": str(work / "answer.mp4"),
                  "served": json.loads(row["message"])}))
EOF
