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
from fewshot.learning.bias_correction import DEFAULT_OFFSETS, ScoringCandidate, choose_scoring
from fewshot.model.checkpoint import load_checkpoint
from services import BIN, ROOT, free_port, wait_http

MODEL = "loop-detector"
pytestmark = pytest.mark.integration


def submit(job_address: str, args: list[str], timeout: int = 900, env: dict | None = None,
           expect_ok: bool = True) -> str:
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env})] if env else []
    cmd = [str(BIN / "ray"), "job", "submit", "--address", job_address, "--working-dir", str(ROOT),
           *runtime_env, "--", sys.executable, *args]
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        # the Jobs API answers before its agent is ready on a freshly started cluster
        if proc.returncode == 0 or "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(3)
    if expect_ok:
        assert proc.returncode == 0, f"job failed: {' '.join(args)}\n{out[-6000:]}"
    else:
        assert proc.returncode != 0, f"job should have failed: {' '.join(args)}\n{out[-6000:]}"
    return out


# what test_whole_loop leaves for the tests after it: the endpoint and the common flags
STATE: dict = {}


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


def test_whole_loop(cluster, tiny_catalog, mlflow_uri, tiny_teacher_spec, tmp_path):
    manifest = tiny_catalog.manifest("synthworld")
    split = manifest.class_split("split1")
    novel = list(split.novel[:2])
    common = ["--catalog", str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL,
              "--max-test-images", "20"]

    # base training distils the teacher (its embeddings of every train box are cached first);
    # no refiner for version 1, so Serve's "no refiner" answer is checked below
    out = submit(cluster, ["jobs/base_train.py", "--steps", "12", "--batch-size", "4",
                           "--num-workers", "2", "--checkpoint-every", "6", "--teacher", tiny_teacher_spec,
                           "--distill-beta", "0.5", "--no-refine", "--augment", "dihedral", *common])
    assert "registered loop-detector version 1 (champion)" in out
    assert "caching embedded-" in out
    v1 = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    assert v1.tags["distill_beta"] == "0.5"
    client = registry.client(mlflow_uri)
    base_run = client.search_runs([client.get_experiment_by_name("fewshot-base").experiment_id],
                                  "attributes.run_name = 'base-synthworld'")[0]
    assert base_run.data.metrics["train/loss_distill"] > 0  # teacher embeddings kept through the rotations
    assert base_run.data.params["augment"] == "dihedral"
    assert v1.version == 1 and v1.classes == list(split.base) and v1.parent_version is None
    assert "bAP50" in v1.tags

    from serving.app import DetectorService

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(DetectorService.options(user_config={
        "model_name": MODEL, "tracking_uri": mlflow_uri, "poll_interval_s": 1.0,
        "score_threshold": 0.0}).bind(), name="loop", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    STATE.update(url=url, common=common, novel=list(split.novel))
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
                               "--max-val-images", "8", *common])  # bias correction and --scoring auto: defaults
        assert "as 'champion'" in out
        deadline = time.time() + 120
        while time.time() < deadline and 2 not in versions:
            time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=60)

    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    # the fusion weight was chosen on val per offset the bias correction asked about (judged as served)
    assert "embedding" in out and "val base AP50 as served" in out and "(fusion weight " in out
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
    # --freeze backbone trains the box head: the parent labelled its own classes on the support
    # images first (pseudo-labels on by default at 0.9); the tag says how many it added
    threshold, added = v2.tags["pseudo_labels"].split(":")
    assert threshold == "0.9" and int(added) >= 0
    assert f"the parent labelled {added} objects of its own classes (score >= 0.9)" in out
    # and held the old classes' outputs to the parent's while the box head trained (lambda 1)
    assert v2.tags["parent_distill"] == "1" and "parent distillation lambda=1, " in out
    assert json.loads(v2.tags["config"])["parent_distill"] == 1.0
    # --scoring auto (the default): joint and per-increment scoring were each judged on val with
    # their own offset rule and the version keeps the one choose_scoring prefers; the registered
    # checkpoint carries the increments' row ends and that choice, Serve reads both
    assert v2.tags["scoring_option"] == "auto" and "scoring=auto)" in out
    candidates = json.loads(v2.tags["scoring_val"])
    assert [c["scoring"] for c in candidates] == ["joint", "per-increment"]
    assert next(c for c in candidates if c["scoring"] == "per-increment")["offset"] == 0.0
    want = choose_scoring([ScoringCandidate(**{k: c[k] for k in ("scoring", "offset", "met", "bAP50", "nAP50")})
                           for c in candidates])
    assert v2.tags["scoring"] == want.scoring and f"{want.scoring} scoring, new rows' logit offset" in out
    assert float(v2.tags["bias_correction_offset"]) == want.offset
    v2_heads = load_checkpoint(registry.download_checkpoint(mlflow_uri, MODEL, 2, tmp_path / "v2")
                               ).build_model().roi_heads
    clf = v2_heads.box_predictor.cls_score
    assert clf.scoring == want.scoring
    # --retain-heads (the default): v1's head answers the base classes under per-increment
    # scoring; a joint version drops it, since joint scoring never asks it
    kept = 1 if want.scoring == "per-increment" else 0
    assert v2.tags["retained_heads"] == str(kept) and len(v2_heads.retained) == kept
    assert [h.columns.tolist() for h in v2_heads.retained.heads] == [[1, len(split.base) + 1]] * kept
    assert clf.increment_ends.tolist() == [len(split.base) + 1, len(split.base) + 1 + len(novel)]
    assert clf.logit_bias[len(split.base) + 1:].tolist() == [want.offset] * len(novel)
    assert body["model"]["scoring"] == want.scoring   # Serve says how the answering version scores
    assert body["model"]["retained_heads"] == kept
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
    # bias correction chose the new rows' offset on the same val images, judged as served (the
    # version is refined); the gate scored the corrected detector with the refiner fitted for that
    # offset, so a choice that met the rule shows in the gate's figures
    offset = float(v2.tags["bias_correction_offset"])
    assert offset <= 0.0 and f"new rows' logit offset {offset:g}" in out
    scoring_selection = json.load(open(client.download_artifacts(client.get_model_version(MODEL, "2").run_id,
                                                                 "scoring/selection.json")))
    assert scoring_selection["chosen"] == want.scoring and scoring_selection["candidates"] == candidates
    assert v2.tags["bias_correction_judged"] == "served" and "as served with CLIP refinement" in out
    assert v2.tags["bias_correction_met"] in ("true", "false")
    selection = client.download_artifacts(client.get_model_version(MODEL, "2").run_id,
                                          "bias_correction/selection.json")
    selection = json.load(open(selection))
    assert selection["met"] == (v2.tags["bias_correction_met"] == "true") and selection["chosen"] == offset
    assert selection["max_base_drop"] == 0.01 and selection["judged"] == "served"
    # the rule, recomputed from the logged figures: the detector's 1.0 allowance lets every offset
    # through, so each offset closer to zero than the chosen one was judged as served and missed
    floor = selection["parent_val_served_bAP50"] - selection["max_base_drop"] - 1e-9
    by_size = sorted(selection["offsets"], key=lambda r: abs(r["offset"]))
    chosen = next(r for r in by_size if r["offset"] == offset)
    for row in by_size[: by_size.index(chosen)]:
        assert row["served_bAP50"] < floor, (row, selection)
    if selection["met"]:
        assert chosen["served_bAP50"] >= floor, selection
        assert figures["served_change"] >= -0.01 - 1e-9, figures
        assert chosen["served_bAP50"] == pytest.approx(figures["child_served"], abs=1e-6)
    else:  # no offset met it: the best old-class AP50 of the detector was kept
        assert all(r["served_bAP50"] < floor for r in by_size), selection
    assert v2.tags["report_split"] == "test" and v2.tags["promotion"] == "champion"
    assert "incomplete" not in v2.tags  # the promotion actor removed it with the alias move
    mv = client.get_model_version(MODEL, "2")
    assert mv.description.startswith("Adds ") and "Gate passed on 8 val images" in mv.description
    logged = {a.path for a in client.list_artifacts(mv.run_id, "bias_correction")}
    assert logged == {"bias_correction/offset.png", "bias_correction/selection.json"}
    # the selection table is the chosen scoring's grid: one offset (0) under per-increment scoring
    grid = [r["offset"] for r in json.load(open(client.download_artifacts(mv.run_id, "bias_correction/selection.json")
                                                ))["offsets"]]
    assert grid == ([0.0] if want.scoring == "per-increment" else sorted(DEFAULT_OFFSETS, reverse=True)), grid
    assert client.get_run(mv.run_id).data.metrics["bias_correction_offset"] == offset


def _served_version(url: str) -> int:
    return requests.get(f"{url}/healthz", timeout=10).json()["model"]["version"]


def _wait_served(url: str, version: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and _served_version(url) != version:
        time.sleep(0.5)
    assert _served_version(url) == version


def _add(cluster, classes, *extra: str) -> list[str]:
    return ["jobs/add_classes.py", "--classes", classes, "--shots", "2", "--steps", "4", "--batch-size", "4",
            "--max-base-drop", "1.0", "--max-detector-drop", "1.0", "--cpus-per-worker", "1",
            "--max-val-images", "6", *extra, *STATE["common"]]


def test_two_jobs_at_once_lose_no_class(cluster, mlflow_uri):
    """Two add_classes jobs started together on the same champion: one is promoted, the other
    stays a candidate that says why, and the champion still serves every class it served."""
    url, (a, b) = STATE["url"], STATE["novel"][2:4]
    parent = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    outs = {}
    flags = {a: ("--scoring", "per-increment"), b: ()}   # b: add_classes' default, --scoring auto
    jobs = [threading.Thread(target=lambda c=c: outs.__setitem__(c, submit(cluster, _add(cluster, c, *flags[c]))))
            for c in (a, b)]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(timeout=900)
    assert set(outs) == {a, b}
    new = [registry.get_version(mlflow_uri, MODEL, v.version) for v in registry.list_versions(mlflow_uri, MODEL)
           if v.parent_version == parent.version and v.tags.get("new_classes") in (a, b)]
    assert len(new) == 2
    by_class = {v.tags["new_classes"]: v for v in new}
    # --scoring per-increment is kept as asked (no choice made); auto's choice is one of the two,
    # whatever the parent's scoring
    assert (by_class[a].tags["scoring"], by_class[a].tags["scoring_option"]) == ("per-increment", "per-increment")
    assert "scoring_val" not in by_class[a].tags
    assert by_class[b].tags["scoring_option"] == "auto"
    assert by_class[b].tags["scoring"] in ("joint", "per-increment") and "scoring_val" in by_class[b].tags
    promoted = [v for v in new if "champion" in v.aliases]
    assert len(promoted) == 1, [(v.version, v.aliases, v.tags.get("promotion_reason")) for v in new]
    other = next(v for v in new if v is not promoted[0])
    assert other.tags["promotion"] == "candidate" and "champion moved to" in other.tags["promotion_reason"]
    assert "NOT promoted: champion moved" in outs[other.tags["new_classes"]]
    _wait_served(url, promoted[0].version)
    served = requests.get(f"{url}/v1/classes", timeout=10).json()["classes"]
    assert set(parent.classes) <= set(served) and promoted[0].tags["new_classes"] in served


@pytest.mark.parametrize("point", ["after_finetune", "after_register"])
def test_a_job_killed_half_way_changes_nothing(point, cluster, mlflow_uri, tiny_catalog):
    url = STATE["url"]
    champion = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    served = requests.get(f"{url}/v1/classes", timeout=10).json()
    missing = [c for c in STATE["novel"] if c not in champion.classes][:1] or ["hexagon"]
    before_versions = {v.version for v in registry.list_versions(mlflow_uri, MODEL)}
    class_sets = sorted(p.name for p in (tiny_catalog.root / "class_sets").glob("*.json"))
    out = submit(cluster, _add(cluster, missing[0]), env={"FEWSHOT_KILL_AT": point}, expect_ok=False)
    assert f"FEWSHOT_KILL_AT={point}: killing this job now" in out
    assert registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version == champion.version
    assert registry.get_alias(mlflow_uri, MODEL, registry.CANDIDATE) is None or \
        registry.get_alias(mlflow_uri, MODEL, registry.CANDIDATE).version in before_versions
    assert sorted(p.name for p in (tiny_catalog.root / "class_sets").glob("*.json")) == class_sets
    time.sleep(2)  # more than the replica's poll interval
    assert requests.get(f"{url}/v1/classes", timeout=10).json() == served
    added = [registry.get_version(mlflow_uri, MODEL, v.version) for v in registry.list_versions(mlflow_uri, MODEL)
             if v.version not in before_versions]
    if point == "after_finetune":
        assert added == []
    else:  # registered, never promoted: tagged unfinished, no alias names it
        assert len(added) == 1 and added[0].tags["incomplete"] == "true" and added[0].aliases == []


def test_rollback_puts_the_parent_back_in_service(cluster, mlflow_uri, tiny_catalog):
    url = STATE["url"]
    champion = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    out = submit(cluster, ["jobs/promote.py", "--rollback", "--reason", "integration test rollback",
                           "--catalog", str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL])
    assert f"champion v{champion.version} -> v{champion.parent_version}" in out
    _wait_served(url, champion.parent_version, timeout=30)  # the replica polls every second
    body = requests.post(f"{url}/v1/detect", data=tiny_catalog.read_split("synthworld", "test").slice(0, 1)
                         .column("image")[0].as_py(), timeout=30).json()
    assert body["model"]["version"] == champion.parent_version
    parent = registry.get_version(mlflow_uri, MODEL, champion.parent_version)
    assert parent.tags["promotion_kind"] == "rollback" and "integration test rollback" in parent.tags["promotion_reason"]
