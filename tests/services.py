"""Real services for tests: an MLflow tracking server, an S3 server (moto) and local Ray
clusters, on 127.0.0.1.

Each is started by the fixture that needs it and stopped by that fixture when it is done.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
              ok=lambda code: code == 200) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited early\n{log.read_text()[-3000:] if log else ''}")
        try:
            if ok(requests.get(url, timeout=2).status_code):
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout}s\n{log.read_text()[-3000:] if log else ''}")


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a server started with ``start_new_session=True`` (its whole process group),
    SIGKILL it if it has not exited within ``timeout`` seconds."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


@contextmanager
def mlflow_server(state: Path, artifacts: str | None = None, env: dict | None = None):
    """``mlflow server`` with a sqlite backend store and a local artifact store (or
    ``artifacts``, e.g. ``s3://bucket/mlflow`` with the AWS variables in ``env``)."""
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    log = state / "mlflow.log"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
         "--artifacts-destination", artifacts or str(state / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 300, proc, log)  # a loaded 2-core machine can take minutes
        yield uri
    finally:
        stop_group(proc)


class S3:
    """A running S3 server (moto) with one bucket: where it is and how to reach it."""

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint = endpoint
        self.bucket = bucket
        # the standard AWS variables: what a user exports for MinIO or AWS
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        """A real boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys under ``prefix``, without the empty ``folder/`` markers pyarrow
        leaves so that a folder survives its last file being moved away."""
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]


@contextmanager
def s3_server(state: Path, bucket: str = "fewshot-test"):
    """A moto S3 server process on 127.0.0.1 (a free port) with ``bucket`` created."""
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    log = state / "moto.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    s3 = S3(f"http://127.0.0.1:{port}", bucket)
    try:
        wait_http(f"{s3.endpoint}/moto-api/", 120, proc, log)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        stop_group(proc)


class RayNode:
    """A node started with ``ray start --block`` in its own process group."""

    def __init__(self, proc: subprocess.Popen, temp_dir: Path, address: str, log: Path,
                 dashboard_url: str | None = None):
        self.proc, self.temp_dir, self.address, self.log = proc, temp_dir, address, log
        self.dashboard_url = dashboard_url

    def processes(self) -> list[int]:
        """Pids of this node's processes still alive: any process of this user that
        names the node's temp dir in its command line or environment."""
        marker = str(self.temp_dir).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if d.stat().st_uid != os.getuid():
                    continue
                if marker in (d / "cmdline").read_bytes() or marker in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """SIGTERM the node's process group, then SIGKILL whatever of it is left (by pid:
        never ``ray stop``, which would stop every Ray on the machine)."""
        try:
            os.killpg(self.proc.pid, 15)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        deadline = time.time() + 15
        while time.time() < deadline and self.processes():
            time.sleep(0.5)
        for pid in self.processes():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def ray_env(pythonpath: bool = True) -> dict:
    """Environment for a test Ray node: loopback only, no token auth, this venv's
    binaries first on PATH; with ``pythonpath=False`` the checkout is NOT on PYTHONPATH
    (code must then come from a runtime env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER stays unset (a multi-node cluster needs it unset or
    # 1); --node-ip-address 127.0.0.1 keeps every node on loopback instead
    env.update(RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT)])
    else:
        env.pop("PYTHONPATH", None)
    return env


def _node_ports() -> list[str]:
    """Free ports for everything a node listens on (other Ray clusters share this machine);
    worker port 0: each worker lets the OS pick."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0"]


def _start_node(args: list[str], temp_dir: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                             "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
                             "--object-store-memory", str(150 * 1024 ** 2), *args, *_node_ports()],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=temp_dir, start_new_session=True)


def _wait_nodes(address: str, n: int, env: dict, timeout: float, node: RayNode) -> None:
    """Until the cluster at ``address`` has ``n`` alive nodes."""
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(x['Alive'] for x in ray.nodes()))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray start exited\n{node.log.read_text()[-3000:]}")
        r = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise TimeoutError(f"{n} Ray node(s) not up at {address} after {timeout}s\n"
                       f"{node.log.read_text()[-3000:]}")


@contextmanager
def ray_head(state: Path, *, num_cpus: int = 1, resources: dict | None = None,
             dashboard: bool = False, env: dict | None = None, timeout: float = 300):
    """A Ray head on 127.0.0.1 (free ports, its own temp dir) run by ``ray start --head``;
    with ``dashboard`` also the Jobs API (``node.dashboard_url``) for ``ray job submit``."""
    env = ray_env() if env is None else env
    state.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    args = ["--head", "--port", str(port), "--num-cpus", str(num_cpus),
            "--ray-client-server-port", str(free_port())]
    url = None
    if dashboard:
        dport = free_port()
        args += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dport)]
        url = f"http://127.0.0.1:{dport}"
    else:
        args += ["--include-dashboard", "false"]
    if resources:
        args += ["--resources", json.dumps(resources)]
    log = state / "ray-head.log"
    node = RayNode(_start_node(args, temp_dir, log, env), temp_dir, f"127.0.0.1:{port}", log, url)
    try:
        _wait_nodes(node.address, 1, env, timeout, node)
        if url:
            wait_http(f"{url}/api/version", timeout, node.proc, log)
        yield node
    finally:
        node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def ray_worker_node(head: RayNode, state: Path, *, num_cpus: int = 1,
                    resources: dict | None = None, env: dict | None = None, timeout: float = 300):
    """A second Ray node on this machine joined to ``head``, with its own temp dir (the
    "other machine" of a two-node test); custom ``resources`` place tasks on it."""
    env = ray_env() if env is None else env
    state.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="rayw-", dir="/tmp"))
    args = ["--address", head.address, "--num-cpus", str(num_cpus)]
    if resources:
        args += ["--resources", json.dumps(resources)]
    log = state / f"ray-worker-{temp_dir.name}.log"
    node = RayNode(_start_node(args, temp_dir, log, env), temp_dir, head.address, log)
    try:
        _wait_nodes(head.address, 2, env, timeout, node)
        yield node
    finally:
        node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def load_job(name: str):
    """Import ``jobs/<name>.py`` as a module (the jobs are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def untrained_base_checkpoint(catalog, path: Path, class_split: str = "split1",
                              class_set: str = "cs-test") -> Path:
    """A ``cpu-small`` detector over a class split's base classes, saved untrained (seed 0)."""
    import torch

    from fewshot.model.checkpoint import save_checkpoint
    from fewshot.model.presets import preset
    from fewshot.model.detector import build_detector

    manifest = catalog.manifest("synthworld")
    classes = list(manifest.class_split(class_split).base)
    ids = [manifest.category_by_name()[c].id for c in classes]
    cfg = preset("cpu-small")
    torch.manual_seed(0)
    return save_checkpoint(path, build_detector(cfg, len(classes) + 1), cfg, classes, ids,
                           "synthworld", class_set)


def register_champion(catalog, uri: str, model: str, path: Path, experiment: str):
    """Register an untrained base model as ``model``'s champion; returns its VersionInfo."""
    import mlflow

    from fewshot.backends import registry

    ckpt_path = untrained_base_checkpoint(catalog, path)
    from fewshot.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        v = registry.register_detector(uri, model, ckpt_path, classes=ckpt.classes,
                                       class_set=ckpt.class_set, parent_version=None, shots=None,
                                       extra_tags={"dataset": "synthworld"})
    registry.set_alias(uri, model, registry.CHAMPION, v.version)
    return v
