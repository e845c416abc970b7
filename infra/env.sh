# Shared settings for the local stack; sourced by the other infra scripts.
# Everything binds to 127.0.0.1. Override any of these in the environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FEWSHOT_STATE="${FEWSHOT_STATE:-$ROOT/.state}"
# The catalog: a folder or a URI (s3://bucket/prefix; AWS_ENDPOINT_URL and the AWS keys
# select MinIO or another S3 API). Ray Train checkpoints: FEWSHOT_RAY_STORAGE, same forms.
export FEWSHOT_CATALOG="${FEWSHOT_CATALOG:-$FEWSHOT_STATE/catalog}"
FEWSHOT_VENV="${FEWSHOT_VENV:-$ROOT/.venv}"
export RAY_PORT="${RAY_PORT:-6390}"
export RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
export MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export SERVE_PORT="${SERVE_PORT:-8000}"
# The head's session files: its processes name this folder on their command line, which is how
# stop_local.sh finds them (and no other Ray on the machine). Short: Ray's sockets live under it.
FEWSHOT_RAY_TMP="${FEWSHOT_RAY_TMP:-/tmp/fewshot-ray-$(id -u)-$RAY_PORT}"
# Logical CPUs Ray schedules with: twice the cores, so the demo can train (2 workers) while
# Serve holds a replica; torch threads per worker are set separately (--cpus-per-worker).
export RAY_NUM_CPUS="${RAY_NUM_CPUS:-$(( $(nproc) * 2 ))}"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export RAY_JOB_ADDRESS="http://127.0.0.1:$RAY_DASHBOARD_PORT"
export PATH="$FEWSHOT_VENV/bin:$PATH"
# Single-node, loopback-only Ray: with this unset Ray replaces 127.0.0.1 by the machine's
# network address. (Ray's switch for this is named after the platforms where it is the default.)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# The local stack listens on 127.0.0.1 only; Ray's token authentication is for clusters
# reachable from a network (turn it on with RAY_AUTH_MODE=token there).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
