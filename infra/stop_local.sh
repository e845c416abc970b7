#!/usr/bin/env bash
# Stop everything start_local.sh and deploy_serve.sh started. State (catalog, MLflow db,
# artifacts) stays in $FEWSHOT_STATE; delete that folder for a clean slate.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Only the head start_local.sh started: its processes name $FEWSHOT_RAY_TMP on their command line,
# and its workers and agents (whose titles Ray rewrites) are their descendants. `ray stop` would
# stop every Ray of this user on the machine: other clusters, other checkouts.
head_pids() {
  local d roots=""
  for d in /proc/[0-9]*; do
    [ -O "$d" ] && [ "${d#/proc/}" != "$$" ] || continue
    tr '\0' ' ' <"$d/cmdline" 2>/dev/null | grep -qF -- "$FEWSHOT_RAY_TMP/" && roots="$roots ${d#/proc/}"
  done
  [ -n "$roots" ] || return 0
  ps -eo pid=,ppid= | awk -v roots="$roots" '
    { parent[$1] = $2 }
    END {
      n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1
      do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
      for (p in keep) print p
    }'
}
pids=$(head_pids)
if [ -n "$pids" ]; then
  # Serve's applications first (their replicas are actors of this head; the address is this
  # head's only when the head is running, so another cluster's Serve is never asked)
  serve shutdown --address "$RAY_JOB_ADDRESS" -y >/dev/null 2>&1 || true
  pids=$(head_pids)
  kill $pids 2>/dev/null
  for _ in $(seq 1 30); do [ -z "$(head_pids)" ] && break; sleep 0.5; done
  left=$(head_pids); [ -n "$left" ] && kill -9 $left 2>/dev/null
  echo "ray: stopped"
fi
if [ -f "$FEWSHOT_STATE/mlflow.pid" ]; then
  pid=$(cat "$FEWSHOT_STATE/mlflow.pid")
  pkill -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null && echo "mlflow: stopped"
  rm -f "$FEWSHOT_STATE/mlflow.pid"
fi
