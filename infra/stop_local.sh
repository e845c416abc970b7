#!/usr/bin/env bash
# Stop everything start_local.sh and deploy_serve.sh started. State (catalog, MLflow db,
# artifacts) stays in $FEWSHOT_STATE; delete that folder for a clean slate.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
serve shutdown --address "$RAY_JOB_ADDRESS" -y >/dev/null 2>&1 || true
ray stop --force >/dev/null 2>&1 && echo "ray: stopped"
if [ -f "$FEWSHOT_STATE/mlflow.pid" ]; then
  pid=$(cat "$FEWSHOT_STATE/mlflow.pid")
  pkill -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null && echo "mlflow: stopped"
  rm -f "$FEWSHOT_STATE/mlflow.pid"
fi
