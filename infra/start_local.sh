#!/usr/bin/env bash
# Start the local stack: a Ray head (with the Jobs API) and an MLflow tracking server
# (sqlite backend store, local artifact store). Reuses whatever is already running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mkdir -p "$FEWSHOT_STATE/logs" "$FEWSHOT_STATE/mlartifacts"

# Something else on a port this stack needs: say so now (Ray would start without its Jobs API,
# and `ray job submit` would then reach the other process).
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
refuse_port() {
  echo "error: 127.0.0.1:$2 ($1) is already taken by another process, not by this stack." >&2
  echo "       Stop that process, or choose a free port for this stack: $1=<port> make demo" >&2
  echo "       (or export $1=<port> before sourcing infra/env.sh)." >&2
  exit 1
}
mlflow_up=0; curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null 2>&1 && mlflow_up=1
if [ "$mlflow_up" = 0 ]; then port_taken "$MLFLOW_PORT" && refuse_port MLFLOW_PORT "$MLFLOW_PORT"; fi
ray_up=0   # `ray status` retries for ~40 s when nothing listens: ask only when something does
if port_taken "$RAY_PORT"; then
  ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1 && ray_up=1 || refuse_port RAY_PORT "$RAY_PORT"
fi
if [ "$ray_up" = 0 ]; then port_taken "$RAY_DASHBOARD_PORT" && refuse_port RAY_DASHBOARD_PORT "$RAY_DASHBOARD_PORT"; fi

# MLflow first, in the background: its server and Ray's head each take tens of seconds to come
# up, so the two start side by side and the health check waits for MLflow after Ray is up.
mlflow_started=0
if [ "$mlflow_up" = 1 ]; then
  echo "mlflow: already running at $MLFLOW_TRACKING_URI"
else
  echo "mlflow: starting at $MLFLOW_TRACKING_URI (store $FEWSHOT_STATE/mlflow.db)"
  nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$FEWSHOT_STATE/mlflow.db" \
    --artifacts-destination "$FEWSHOT_STATE/mlartifacts" \
    >"$FEWSHOT_STATE/logs/mlflow.log" 2>&1 &
  echo $! >"$FEWSHOT_STATE/mlflow.pid"
  mlflow_started=1
fi

if [ "$ray_up" = 1 ]; then
  echo "ray: already running at 127.0.0.1:$RAY_PORT"
else
  echo "ray: starting head at 127.0.0.1:$RAY_PORT (dashboard/jobs $RAY_JOB_ADDRESS, $RAY_NUM_CPUS CPUs)"
  ray start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --temp-dir="$FEWSHOT_RAY_TMP" \
    --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
    --num-cpus="$RAY_NUM_CPUS" --disable-usage-stats >"$FEWSHOT_STATE/logs/ray-start.log" 2>&1 \
    || { cat "$FEWSHOT_STATE/logs/ray-start.log"; exit 1; }
fi

if [ "$mlflow_started" = 1 ]; then
  for _ in $(seq 1 120); do
    curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null || { tail -30 "$FEWSHOT_STATE/logs/mlflow.log"; exit 1; }
  echo "mlflow: up"
fi
