"""Real services for tests: an MLflow tracking server and a local Ray cluster, on 127.0.0.1.

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
