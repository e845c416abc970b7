"""Glue: the MLflow model registry as the platform uses it.

One registered model per deployment (default ``fewshot-detector``); version N is a class set.
Each version carries the tags ARCHITECTURE.md names (``class_set``, ``classes`` as an ordered
JSON list, ``parent_version``, ``shots``) plus its evaluation figures. ``champion`` is the
alias Serve answers with; ``candidate`` marks a version that did not pass the gate.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_MODEL_NAME = "fewshot-detector"
CHAMPION = "champion"
CANDIDATE = "candidate"
MODEL_ARTIFACT = "detector"
PIP_REQUIREMENTS = ["torch", "torchvision", "pillow", "numpy", "fewshot-platform"]


@dataclass
class VersionInfo:
    name: str
    version: int
    classes: list[str]
    class_set: str
    parent_version: int | None
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def tracking_uri(uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow tracking server: pass --mlflow-uri or set MLFLOW_TRACKING_URI")
    return uri


def client(uri: str | None = None) -> MlflowClient:
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _info(mv) -> VersionInfo:
    tags = dict(mv.tags or {})
    parent = tags.get("parent_version")
    return VersionInfo(
        name=mv.name,
        version=int(mv.version),
        classes=json.loads(tags.get("classes", "[]")),
        class_set=tags.get("class_set", ""),
        parent_version=int(parent) if parent not in (None, "", "none") else None,
        run_id=mv.run_id,
        tags=tags,
        aliases=list(getattr(mv, "aliases", []) or []),
    )


def get_version(uri: str | None, name: str, version: int) -> VersionInfo:
    return _info(client(uri).get_model_version(name, str(version)))


def get_alias(uri: str | None, name: str, alias: str = CHAMPION) -> VersionInfo | None:
    """The version behind ``alias``, or None when the model or the alias does not exist."""
    try:
        mv = client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
            return None
        raise
    return _info(mv)


def list_versions(uri: str | None, name: str) -> list[VersionInfo]:
    """Every version, oldest first. MLflow's search leaves ``aliases`` empty: read one version
    with :func:`get_version` (or an alias with :func:`get_alias`) when they matter."""
    versions = client(uri).search_model_versions(f"name='{name}'")
    return sorted((_info(v) for v in versions), key=lambda v: v.version)


def register_detector(
    uri: str | None,
    name: str,
    checkpoint_path: str | Path,
    *,
    classes: list[str],
    class_set: str,
    parent_version: int | None,
    shots: int | None,
    extra_tags: dict[str, str] | None = None,
    description: str | None = None,
) -> VersionInfo:
    """Log the checkpoint as a pyfunc model in the active run and register it as a new version
    with every tag (and ``description``, the sentence the MLflow UI shows on the version)."""
    from fewshot.backends.pyfunc import DetectorPyfunc, input_example, pyfunc_artifacts, signature

    client(uri)
    if mlflow.active_run() is None:
        raise RuntimeError("register_detector must be called inside an MLflow run")
    # the signature's params schema is what makes MLflow pass score_threshold/refine on;
    # the teacher artifact makes the version answer refined wherever it is loaded
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=DetectorPyfunc(),
        artifacts=pyfunc_artifacts(checkpoint_path),
        signature=signature(),
        input_example=input_example(),
        pip_requirements=PIP_REQUIREMENTS,
    )
    tags = {
        "class_set": class_set,
        "classes": json.dumps(list(classes)),
        "parent_version": "none" if parent_version is None else str(parent_version),
        "shots": "none" if shots is None else str(shots),
        **(extra_tags or {}),
    }
    mv = mlflow.register_model(info.model_uri, name, tags=tags, await_registration_for=120)
    if description:
        client(uri).update_model_version(name, str(mv.version), description=description)
    return get_version(uri, name, int(mv.version))


def set_alias(uri: str | None, name: str, alias: str, version: int) -> None:
    client(uri).set_registered_model_alias(name, alias, str(version))


def tag_version(uri: str | None, name: str, version: int, tags: dict[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, str(v))


def delete_tag(uri: str | None, name: str, version: int, key: str) -> None:
    """Remove a version tag (absent: nothing happens)."""
    try:
        client(uri).delete_model_version_tag(name, str(version), key)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
            raise


def set_description(uri: str | None, name: str, version: int, text: str) -> None:
    client(uri).update_model_version(name, str(version), description=text)


def download_checkpoint(uri: str | None, name: str, version: int, dst: str | Path | None = None) -> Path:
    """Fetch the version's ``detector.pt`` into ``dst`` (a temp dir by default)."""
    client(uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(dst) if dst else None
    )
    found = sorted(Path(local).rglob("detector.pt"))
    if not found:
        raise FileNotFoundError(f"models:/{name}/{version} holds no detector.pt")
    return found[0]
