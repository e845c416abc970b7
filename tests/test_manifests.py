"""The cluster manifests, checked offline: every file parses; the cluster-launcher config
validates against the JSON schema inside the ray package; images and versions follow the
pins; the RayService's serve config is the render of serving/serve_config.yaml; the job
entrypoints the manifests run exist and answer --help; kubectl builds the kustomizations.

What needs a cluster is not checked here: ``kubectl apply --dry-run=client`` still asks the
API server for its resource list (it fails offline even for a ConfigMap), the KubeRay CRDs'
own validation, pulling the images and the cloud side of ``ray up``.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from services import ROOT

INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"

# Every flag the manifests pass to a job, per job: the one list to keep in step with the job
# CLIs (test_manifest_flags_are_job_flags checks them against --help once the CLIs settle).
MANIFEST_FLAGS = {
    "add_classes": ["--catalog", "--mlflow-uri", "--storage-path", "--classes", "--shots",
                    "--num-workers", "--gpu"],
}


def _pins() -> dict[str, str]:
    return dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())


RAY = _pins()["ray"]
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PLATFORM_TAG = f"{PROJECT_VERSION}-ray{RAY}"
MLFLOW = _pins()["mlflow"]


def _docs(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kuberay_docs() -> list[dict]:
    return [d for p in sorted(KUBERAY.rglob("*.yaml")) if p.name != "kustomization.yaml"
            for d in _docs(p)]


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _containers(node) -> list[dict]:
    if isinstance(node, dict):
        own = node.get("containers") if isinstance(node.get("containers"), list) else []
        return own + [c for k, v in node.items() if k != "containers" for c in _containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in _containers(v)]
    return []


def _entrypoints() -> list[str]:
    return [d["spec"]["entrypoint"] for d in _kuberay_docs() if d.get("kind") == "RayJob"]


def _job_and_flags(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    m = re.fullmatch(r"/home/ray/fewshot/jobs/(\w+)\.py", argv[1])
    assert m, f"entrypoint must run a job from the image's checkout: {argv[1]}"
    return m.group(1), [a for a in argv[2:] if a.startswith("--")]


# ---- the cluster launcher -------------------------------------------------------------------
def test_cluster_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    cfg = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject mistakes
        jsonschema.validate({**cfg, "max_worker": 4}, schema)
    # and Ray's own loader (defaults filled in, then validated) accepts it
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == f"rayproject/ray:{RAY}-py311-gpu"
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["ray.worker.gpu"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    assert re.match(r"(g|p)\d", gpu["node_config"]["InstanceType"])  # a GPU instance family


# ---- images and versions ----------------------------------------------------------------------
def test_the_image_is_the_pinned_ray_with_the_pinned_project():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY)}$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in requires  # the image's py311
    assert "-c constraints.txt -r infra/requirements-runtime.txt" in text
    for src in re.findall(r"^COPY (?:--\S+ )*(.+?) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"Dockerfile copies {part}, which does not exist"


def test_every_image_follows_the_pins():
    images = set(_images(_kuberay_docs()))
    assert images, "no images found"
    for image in images:
        name, _, tag = image.rpartition(":")
        if name == "fewshot-platform":
            assert tag == PLATFORM_TAG
        elif name == "fewshot-mlflow":
            assert tag == MLFLOW
        else:
            assert name == "postgres", image
    for doc in _kuberay_docs():
        if doc["kind"] in ("RayCluster", "RayService"):
            spec = doc["spec"].get("rayClusterConfig", doc["spec"])
            assert str(spec["rayVersion"]) == RAY
    for kust in (KUBERAY / "kustomization.yaml", KUBERAY / "jobs" / "kustomization.yaml"):
        tags = {i["name"]: i["newTag"] for i in yaml.safe_load(kust.read_text())["images"]}
        assert tags["fewshot-platform"] == PLATFORM_TAG
        assert tags.get("fewshot-mlflow", MLFLOW) == MLFLOW
    mlflow_docker = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={MLFLOW}" in mlflow_docker
    assert f"ARG BOTO3_VERSION={_pins()['boto3']}" in mlflow_docker
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"] == f"fewshot-mlflow:{MLFLOW}"


def test_ray_pods_and_mlflow_share_one_configuration():
    """Every Ray container (head, workers, submitter) and MLflow read the catalog URI,
    checkpoint storage and AWS settings from the same ConfigMap."""
    docs = _kuberay_docs() + _docs(INFRA / "mlflow" / "mlflow.yaml")
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["metadata"]["name"] == "fewshot-config"
    assert config["data"]["FEWSHOT_CATALOG"].startswith("s3://")
    assert config["data"]["FEWSHOT_RAY_STORAGE"].startswith("s3://")
    for doc in docs:
        if doc["kind"] not in ("RayCluster", "RayService", "RayJob", "Deployment"):
            continue
        for c in _containers(doc):
            refs = [e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])]
            assert "fewshot-config" in refs, (doc["kind"], c["name"])
    mlflow = next(d for d in docs if d["kind"] == "Deployment")
    args = _containers(mlflow)[0]["args"]
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    bucket = config["data"]["FEWSHOT_CATALOG"].split("/")[2]
    assert f"--artifacts-destination=s3://{bucket}/mlflow" in args  # the same object storage


# ---- the RayService's serve config ------------------------------------------------------------
def test_rayservice_is_the_render_of_the_serve_config():
    r = subprocess.run([sys.executable, str(KUBERAY / "render.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location("kuberay_render", KUBERAY / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert (KUBERAY / "rayservice.yaml").read_text() == render.render()
    service = _docs(KUBERAY / "rayservice.yaml")[0]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    assert serve == render.serve_config_for_cluster(local)
    # a change to the source shows up in the render
    changed = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    changed["applications"][0]["deployments"][0]["num_replicas"] = 7
    assert render.serve_config_for_cluster(changed) != serve
    # what a cluster needs instead of the local settings
    assert serve["proxy_location"] == "EveryNode" and "host" not in serve["http_options"]
    app = serve["applications"][0]
    assert app["import_path"] == local["applications"][0]["import_path"] == "serving.app:app"
    tree = ast.parse((ROOT / "serving" / "app.py").read_text())
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "app" for t in n.targets)
               for n in tree.body)
    from serving.app import ServiceSettings  # the replica's typed settings (unknown keys refused)

    known = set(ServiceSettings.model_fields)
    for dep in app["deployments"]:
        assert set(dep["user_config"]) <= known
        assert "tracking_uri" not in dep["user_config"]  # from MLFLOW_TRACKING_URI on the pod
    # the cluster spec is raycluster.yaml's, plus Serve's port on the head
    cluster = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    rendered = service["spec"]["rayClusterConfig"]
    assert rendered["workerGroupSpecs"] == cluster["workerGroupSpecs"]
    ports = rendered["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"containerPort": 8000, "name": "serve"} in ports


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_group():
    spec = _docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1"


# ---- job entrypoints ----------------------------------------------------------------------------
def test_manifest_entrypoints_exist_and_answer_help():
    entrypoints = _entrypoints()
    assert entrypoints
    found: dict[str, list[str]] = {}
    for e in entrypoints:
        job, flags = _job_and_flags(e)
        assert (ROOT / "jobs" / f"{job}.py").is_file()
        found[job] = flags
        r = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(
                               [str(ROOT / "platform"), str(ROOT)])})
        assert r.returncode == 0, r.stderr[-3000:]
    assert found == MANIFEST_FLAGS  # the list above is the manifests' flags, all of them


def test_manifest_flags_are_job_flags():
    for job, flags in MANIFEST_FLAGS.items():
        r = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "250"})
        for flag in flags:
            assert re.search(rf"(^|\s){re.escape(flag)}[\s,=]", r.stdout), (job, flag)


# ---- kubectl ------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("where", ["infra/kuberay", "infra/kuberay/jobs"])
def test_kubectl_builds_the_kustomization_offline(where):
    r = subprocess.run(["kubectl", "kustomize", where], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    if where.endswith("jobs"):
        assert kinds == ["RayJob"]
    else:
        assert kinds == sorted(["Namespace", "ConfigMap", "RayCluster", "RayService", "Service",
                                "Service", "StatefulSet", "Deployment"])
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "fewshot"
