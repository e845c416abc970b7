"""The whole loop on real components, at tiny scale.

A local Ray cluster (with the Jobs API), a real MLflow server over HTTP and a real Ray Serve
HTTP endpoint: base training as a Ray job -> Serve answers with version 1 -> add 2 classes
with ``ray job submit -- python jobs/add_classes.py`` while requests keep flowing -> Serve
picks up version 2 without a restart and without a failed request -> /v1/classes lists the
new classes, /v1/detect answers with version 2, and version 2's tags name version 1 as parent.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import requests
from ray import serve

from fewshot.backends import registry
from services import BIN, ROOT, free_port, wait_http

MODEL = "loop-detector"
pytestmark = pytest.mark.integration


def submit(job_address: str, args: list[str], timeout: int = 900) -> str:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", job_address, "--working-dir", str(ROOT),
           "--", sys.executable, *args]
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        # the Jobs API answers before its agent is ready on a freshly started cluster
        if proc.returncode == 0 or "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, f"job failed: {' '.join(args)}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start --head --block`` on free loopback ports; stopping it stops its processes."""
    gcs, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    log = temp / "ray-start.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "4",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", str(temp),
         "--disable-usage-stats",
         # every fixed default port gets a free one, so a running demo cluster does not clash
         *[f"--{name}={free_port()}" for name in (
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port")]],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        # any answer means the dashboard is up (401 when Ray's token authentication is on)
        wait_http(f"{address}/api/version", 180, proc, log, ok=lambda code: code < 500)
        ray.init(address=f"127.0.0.1:{gcs}")
        yield address
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_whole_loop(cluster, tiny_catalog, mlflow_uri, tiny_teacher_spec):
    manifest = tiny_catalog.manifest("synthworld")
    split = manifest.class_split("split1")
    novel = list(split.novel[:2])
    common = ["--catalog", str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL,
              "--max-test-images", "20"]

    # base training distils the teacher (its embeddings of every train box are cached first);
    # no refiner for version 1, so Serve's "no refiner" answer is checked below
    out = submit(cluster, ["jobs/base_train.py", "--steps", "12", "--batch-size", "4",
                           "--num-workers", "2", "--checkpoint-every", "6", "--teacher", tiny_teacher_spec,
                           "--distill-beta", "0.5", "--no-refine", *common])
    assert "registered loop-detector version 1 (champion)" in out
    assert "caching embedded-" in out
    v1 = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    assert v1.tags["distill_beta"] == "0.5"
    client = registry.client(mlflow_uri)
    base_run = client.search_runs([client.get_experiment_by_name("fewshot-base").experiment_id],
                                  "attributes.run_name = 'base-synthworld'")[0]
    assert base_run.data.metrics["train/loss_distill"] > 0
    assert v1.version == 1 and v1.classes == list(split.base) and v1.parent_version is None
    assert "bAP50" in v1.tags

    from serving.app import DetectorService

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(DetectorService.options(user_config={
        "model_name": MODEL, "tracking_uri": mlflow_uri, "poll_interval_s": 1.0,
        "score_threshold": 0.0}).bind(), name="loop", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/healthz", timeout=10).json()["model"]["version"] == 1
    image = tiny_catalog.read_split("synthworld", "test").slice(0, 1).column("image")[0].as_py()
    first = requests.post(f"{url}/v1/detect", data=image, timeout=60).json()
    assert first["refinement"]["applied"] is False  # version 1 was trained without a teacher
    assert "no CLIP refiner" in first["refinement"]["reason"]

    statuses: list[int] = []
    versions: set[int] = set()
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            r = requests.post(f"{url}/v1/detect", data=image, timeout=60)
            statuses.append(r.status_code)
            if r.ok:
                versions.add(r.json()["model"]["version"])
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        out = submit(cluster, ["jobs/add_classes.py", "--classes", ",".join(novel), "--shots", "2",
                               "--steps", "6", "--batch-size", "4", "--max-base-drop", "1.0", "--max-detector-drop", "1.0",
                               "--cpus-per-worker", "1", "--freeze", "backbone", "--balancer", "pgb",
                               "--teacher", tiny_teacher_spec, "--distill-beta", "0.5",
                               "--max-val-images", "8", *common])
        assert "as 'champion'" in out
        deadline = time.time() + 120
        while time.time() < deadline and 2 not in versions:
            time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=60)

    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    assert "embedding" in out and "choosing the CLIP fusion weight on 8 val images" in out
    assert versions == {1, 2}, versions

    classes = requests.get(f"{url}/v1/classes", timeout=10).json()
    assert classes["model"]["version"] == 2
    assert classes["classes"] == list(split.base) + novel

    r = requests.post(f"{url}/v1/detect", files={"file": ("x.png", image, "image/png")}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["model"]["version"] == 2 and body["image"] == {"width": 160, "height": 160}
    for det in body["detections"]:
        assert det["label"] in classes["classes"] and len(det["box"]) == 4

    # version 2 carries a CLIP refiner: applied by default, off on request, weight = the tag
    v2 = registry.get_version(mlflow_uri, MODEL, 2)
    weight = float(v2.tags["refine_fusion_weight"])
    assert 0.0 <= weight <= 1.0 and v2.tags["refine_teacher"].startswith("embedded-")
    assert v2.tags["distill_beta"] == "0.5" and v2.tags["balancer"] == "pgb"
    assert v2.tags["freeze"] == "backbone" and v2.tags["config_source"] == "flags"
    assert body["refinement"] == {"applied": True, "fusion_weight": weight,
                                  "teacher": v2.tags["refine_teacher"]}
    for det in body["detections"]:
        assert "det_score" in det
    off = requests.post(f"{url}/v1/detect?refine=false", data=image, timeout=30).json()
    assert off["refinement"]["applied"] is False and off["refinement"]["fusion_weight"] == weight
    assert all("det_score" not in d for d in off["detections"])

    v2 = registry.get_version(mlflow_uri, MODEL, 2)
    assert v2.parent_version == 1 and v2.tags["parent_version"] == "1"
    assert json.loads(v2.tags["classes"]) == list(split.base) + novel
    assert v2.tags["shots"] == "2" and "nAP50" in v2.tags and "bAP50" in v2.tags
    assert "champion" in v2.aliases

    # the gate judged on val, like for like, and says so in one readable place
    figures = json.loads(v2.tags["gate_figures"])
    assert figures["split"] == "val" and figures["images"] == 8
    assert figures["child_refined"] is True and figures["parent_refined"] is False
    assert {"served_change", "unrefined_change"} <= set(figures)
    assert "on val" in v2.tags["gate_rule"] and v2.tags["gate"] == "passed"
    assert v2.tags["report_split"] == "test" and v2.tags["promotion"] == "champion"
    assert "incomplete" not in v2.tags  # the promotion actor removed it with the alias move
    mv = client.get_model_version(MODEL, "2")
    assert mv.description.startswith("Adds ") and "Gate passed on 8 val images" in mv.description
