"""The serving app under Ray Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``):
the replica answers HTTP on its own port, with the same answers, errors and OpenAPI schema
as through the proxy.

The flag is read when Ray's processes start, so the cluster runs in a child process of the
test (this session's other modules start Ray without it); the child prints what it saw as
JSON and the test checks it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services import free_port, ray_env

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
MODEL = "direct-ingress-detector"

PROBE = r'''
import json, socket, sys, time
import requests
import ray
from ray import serve
from imagegen import encode, scene
from serving.app import DetectorService

uri, model, http_port, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
out = {}
try:
    serve.start(http_options={"host": "127.0.0.1", "port": http_port, "request_timeout_s": 60})
    serve.run(DetectorService.options(user_config={
        "model_name": model, "tracking_uri": uri, "poll_interval_s": 30.0, "score_threshold": 0.0,
        "max_batch_size": 4, "batch_wait_timeout_s": 0.0}).bind(), name="direct", route_prefix="/")
    proxy = f"http://127.0.0.1:{http_port}"
    replica = None
    deadline = time.time() + 120
    while replica is None and time.time() < deadline:
        for port in range(lo, hi):
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    continue
            r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            if r.status_code == 200 and "model" in r.json():
                replica = f"http://127.0.0.1:{port}"
        time.sleep(0.5)
    out["replica_port"] = int(replica.rsplit(":", 1)[1]) if replica else None
    img = encode(scene(seed=4))
    for name, url in (("proxy", proxy), ("replica", replica)):
        ok = requests.post(f"{url}/v1/detect", data=img, params={"refine": "false"}, timeout=60)
        bad = requests.post(f"{url}/v1/detect", data=b"\x89PNG\r\n\x1a\nnot really", timeout=60)
        spec = requests.get(f"{url}/openapi.json", timeout=30)
        out[name] = {"status": ok.status_code, "body": ok.json(), "bad_status": bad.status_code,
                     "bad_body": bad.json(), "paths": sorted(spec.json()["paths"])}
finally:
    # stopping the local cluster stops the controller, the proxy and the replica with it
    # (serve.shutdown() waits 30 s for a direct-ingress controller that does not stop)
    ray.shutdown()
print("PROBE " + json.dumps(out))
'''


def test_the_replica_answers_on_its_own_port_as_through_the_proxy(mlflow_uri, tmp_path):
    import mlflow

    from fewshot.backends import registry
    from test_serving_api import CLASSES, make_checkpoint

    ckpt = make_checkpoint(tmp_path / "detector.pt", None, class_set="cs-direct")
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("direct-ingress")
    with mlflow.start_run():
        version = registry.register_detector(mlflow_uri, MODEL, ckpt, classes=CLASSES, class_set="cs-direct",
                                             parent_version=None, shots=None).version
    registry.set_alias(mlflow_uri, MODEL, registry.CHAMPION, version)
    lo = free_port()
    env = {**ray_env(), "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(lo), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(lo + 50),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-c", PROBE, mlflow_uri, MODEL, str(free_port()), str(lo), str(lo + 50)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(line[len("PROBE "):])
    assert seen["replica_port"] is not None and lo <= seen["replica_port"] <= lo + 50
    proxy, replica = seen["proxy"], seen["replica"]
    assert proxy["status"] == replica["status"] == 200
    assert replica["body"]["model"]["version"] == version
    assert replica["body"] == proxy["body"] and replica["body"]["detections"]
    assert proxy["bad_status"] == replica["bad_status"] == 422
    assert replica["bad_body"]["error"]["code"] == proxy["bad_body"]["error"]["code"]
    assert replica["paths"] == proxy["paths"] and "/v1/detect" in replica["paths"]
