"""A throwaway serving stack for the benchmarks: MLflow server, local Ray, Serve, one version.

The version is a small untrained ``cpu-small`` detector with a CLIP refiner on an untrained
embedded teacher (fusion weight 0.5), or, with ``checkpoint``, a trained detector a user
supplies with that refiner (the teacher's cost does not depend on its weights; the number of
boxes a detector returns does, and an untrained one returns its cap on every image).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

MODEL = "bench-detector"
CLASSES = ["circle", "square", "triangle"]
BIN = Path(sys.executable).parent
# a throwaway cluster on loopback for one run: no token authentication (as the tests)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def make_version(work: Path, refine: bool = True, checkpoint: Path | None = None,
                 fusion_weight: float = 0.5) -> Path:
    import shutil

    import torch

    from fewshot.model.checkpoint import load_checkpoint, save_checkpoint, update_extra
    from fewshot.model.presets import preset
    from fewshot.model.detector import build_detector

    if checkpoint is not None:
        path = Path(shutil.copyfile(checkpoint, work / "detector.pt"))
        classes = list(load_checkpoint(path).classes)
    else:
        cfg = preset("cpu-small")
        torch.manual_seed(0)
        classes = CLASSES
        path = save_checkpoint(work / "detector.pt", build_detector(cfg, len(CLASSES) + 1), cfg, CLASSES,
                               [1, 2, 3], "synthworld", "cs-bench")
    if refine:
        from fewshot.clip.refinement import Refiner
        from fewshot.clip.teacher import create_embedded_model, load_teacher, save_embedded_teacher

        model, name = create_embedded_model()
        spec = f"embedded:{save_embedded_teacher(work / 'teacher.pt', model, model_name=name)}"
        update_extra(path, Refiner.build(load_teacher(spec), classes, fusion_weight=fusion_weight).to_extra())
    return path


def bench_images(n: int, checkpoint: Path | None = None) -> list[bytes]:
    """``n`` PNGs: the embedded world's test images for a trained ``checkpoint``, else
    synthetic blobs (:func:`test_image`)."""
    if checkpoint is None:
        return [test_image(s) for s in range(n)]
    from catalog.world import iter_split

    return [row["image"] for row in iter_split("test", n)]


def detector_and_refiner(path: Path):
    """The Answerer a replica would build for ``path`` (same code, in this process)."""
    from fewshot.clip.answering import Answerer, load_refiner
    from fewshot.model.inference import Detector

    det = Detector.from_file(path)
    refiner, _ = load_refiner(det, teacher_spec=f"embedded:{path.parent / 'teacher.pt'}")
    return det, Answerer(det, refiner)


@contextmanager
def serving_stack(user_config: dict | None = None, checkpoint: Path | None = None,
                  fusion_weight: float = 0.5):
    """Yields (url, checkpoint path, deploy(user_config)); everything stops on exit."""
    import mlflow
    import ray
    from ray import serve

    from fewshot.backends import registry
    from serving.app import DetectorService

    with tempfile.TemporaryDirectory() as tmp, mlflow_server(Path(tmp)) as uri:
        work = Path(tmp)
        try:
            path = make_version(work, checkpoint=checkpoint, fusion_weight=fusion_weight)
            from fewshot.model.checkpoint import load_checkpoint

            classes = list(load_checkpoint(path).classes)
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("bench")
            with mlflow.start_run():
                v = registry.register_detector(uri, MODEL, path, classes=classes, class_set="cs-bench",
                                               parent_version=None, shots=None)
            registry.set_alias(uri, MODEL, registry.CHAMPION, v.version)
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            http = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": http, "request_timeout_s": 60})
            base = {"model_name": MODEL, "tracking_uri": uri, "poll_interval_s": 30.0, "score_threshold": 0.3}

            def deploy(cfg: dict) -> None:
                serve.run(DetectorService.options(user_config={**base, **cfg}).bind(),
                          name="bench", route_prefix="/")

            deploy(user_config or {})
            url = f"http://127.0.0.1:{http}"
            wait(f"{url}/healthz", 120)
            yield url, path, deploy
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()


@contextmanager
def mlflow_server(work: Path):
    """An MLflow server on 127.0.0.1 (SQLite + artifacts under ``work``); yields its URI and
    stops its whole process group on exit."""
    port = free_port()
    with (work / "mlflow.log").open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
             "--artifacts-destination", str(work / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait(f"{uri}/health", 300)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)


def test_image(seed: int = 0, w: int = 160, h: int = 160) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), 200, np.uint8)
    for _ in range(5):
        x, y = rng.integers(0, w - 30), rng.integers(0, h - 30)
        arr[y:y + rng.integers(12, 30), x:x + rng.integers(12, 30)] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


DIRECT_PORTS = range(30000, 30100)  # RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT and up


def listening(ports=DIRECT_PORTS) -> set[int]:
    """The ports of ``ports`` something listens on at 127.0.0.1."""
    found = set()
    for port in ports:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                found.add(port)
    return found


def replica_url(proxy_url: str, direct: bool, timeout: float = 120.0) -> str:
    """Where the HTTP rows go: the proxy, or the detector replica's own port (found by its
    ``/healthz``; a redeploy may start a new replica on another port)."""
    if not direct:
        return proxy_url
    deadline = time.time() + timeout
    while time.time() < deadline:
        for port in sorted(listening()):
            try:
                r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                if r.status_code == 200 and "model" in r.json():
                    return f"http://127.0.0.1:{port}"
            except (requests.RequestException, ValueError):
                pass
        time.sleep(0.5)
    raise TimeoutError("no direct-ingress detector replica answered /healthz")
