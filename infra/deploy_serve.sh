#!/usr/bin/env bash
# Deploy (or update in place) the Ray Serve application from serving/serve_config.yaml.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
serve deploy serving/serve_config.yaml --address "$RAY_JOB_ADDRESS"
for _ in $(seq 1 120); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SERVE_PORT/healthz" || true)
  [ "$code" = "200" ] && { echo "serve: http://127.0.0.1:$SERVE_PORT is up"; exit 0; }
  sleep 1
done
echo "serve: not healthy after 120 s"; serve status --address "$RAY_JOB_ADDRESS" || true; exit 1
