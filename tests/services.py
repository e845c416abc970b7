"""Real services for tests: an MLflow tracking server, an S3 server (moto) and local Ray
clusters, on 127.0.0.1.

Each is started by the fixture that needs it and stopped by that fixture when it is done.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
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


@contextmanager
def mlflow_server(state: Path):
    """``mlflow server`` with a sqlite backend store and a local artifact store."""
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    log = state / "mlflow.log"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
         "--artifacts-destination", str(state / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 300, proc, log)  # a loaded 2-core machine can take minutes
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


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
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


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

    from fewshot.checkpoint import save_checkpoint
    from fewshot.config import preset
    from fewshot.detector import build_detector

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

    from fewshot import registry

    ckpt_path = untrained_base_checkpoint(catalog, path)
    from fewshot.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run():
        v = registry.register_detector(uri, model, ckpt_path, classes=ckpt.classes,
                                       class_set=ckpt.class_set, parent_version=None, shots=None,
                                       extra_tags={"dataset": "synthworld"})
    registry.set_alias(uri, model, registry.CHAMPION, v.version)
    return v
