"""The local stack's scripts (infra/start_local.sh, infra/stop_local.sh) beside another Ray
cluster on the same machine: start refuses a port that cluster holds, with the variable to
change, and stop stops this stack's head and nothing of the other cluster."""
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from services import BIN, ROOT, free_port, ray_head

pytestmark = pytest.mark.integration


def _stack_env(state: Path, ray_tmp: str, **ports: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "FEWSHOT_"))}
    env.update(FEWSHOT_STATE=str(state), FEWSHOT_VENV=str(BIN.parent), FEWSHOT_RAY_TMP=ray_tmp,
               RAY_NUM_CPUS="1", **{k: str(v) for k, v in ports.items()})
    return env


def _script(name: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "infra" / name)], env=env, capture_output=True, text=True,
                          timeout=300)


def _pids_naming(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_start_refuses_a_taken_port_and_stop_leaves_other_clusters_running(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="fsr-", dir="/tmp")   # short: Ray's socket paths live under it
    with ray_head(tmp_path / "other", dashboard=True) as other:
        taken = int(other.dashboard_url.rsplit(":", 1)[1])
        ports = dict(RAY_PORT=free_port(), MLFLOW_PORT=free_port(), SERVE_PORT=free_port())

        # the other cluster holds the dashboard port this stack would use: refused, nothing started
        refused = _script("start_local.sh", _stack_env(tmp_path / "state", ray_tmp, RAY_DASHBOARD_PORT=taken, **ports))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"127.0.0.1:{taken} (RAY_DASHBOARD_PORT) is already taken" in refused.stderr
        assert not (tmp_path / "state" / "mlflow.pid").exists() and not _pids_naming(ray_tmp + "/")

        env = _stack_env(tmp_path / "state", ray_tmp, RAY_DASHBOARD_PORT=free_port(), **ports)
        started = _script("start_local.sh", env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "mlflow: up" in started.stdout and _pids_naming(ray_tmp + "/")
        assert requests.get(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/health", timeout=10).status_code == 200

        stopped = _script("stop_local.sh", env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "ray: stopped" in stopped.stdout and "mlflow: stopped" in stopped.stdout
        assert not _pids_naming(ray_tmp + "/")
        # the other cluster is untouched: its processes and its Jobs API are still there
        assert other.processes()
        assert requests.get(f"{other.dashboard_url}/api/version", timeout=10).status_code == 200
