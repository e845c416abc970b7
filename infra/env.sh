# Shared settings for the local stack; sourced by the other infra scripts.
# Everything binds to 127.0.0.1. Override any of these in the environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FEWSHOT_STATE="${FEWSHOT_STATE:-$ROOT/.state}"
export FEWSHOT_CATALOG="${FEWSHOT_CATALOG:-$FEWSHOT_STATE/catalog}"
export VENV="${VENV:-$ROOT/.venv}"
export RAY_PORT="${RAY_PORT:-6390}"
export RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export SERVE_PORT="${SERVE_PORT:-8000}"
export RAY_NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export RAY_JOB_ADDRESS="http://127.0.0.1:$RAY_DASHBOARD_PORT"
export PATH="$VENV/bin:$PATH"
