"""Shared fixtures: a tiny embedded world in a temporary catalog; a real MLflow server."""
from __future__ import annotations

import os
import sys

import pytest

# Ray on loopback only (otherwise it advertises the machine's network address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Test clusters listen on 127.0.0.1 only and live for one test module: no token auth.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from catalog import Catalog
from catalog.world import build_world
from services import mlflow_server, s3_server


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Catalog:
    catalog = Catalog(tmp_path_factory.mktemp("catalog"))
    build_world(catalog, n_train=120, n_val=20, n_test=30, seed=0, progress=False)
    return catalog


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """A real S3 server (moto, its own process on 127.0.0.1) with a bucket; see services.S3."""
    with s3_server(tmp_path_factory.mktemp("s3")) as s3:
        yield s3


@pytest.fixture()
def s3(s3_service, monkeypatch):
    """The S3 server, with the standard AWS variables (AWS_ENDPOINT_URL, keys, region) set
    for this test, as a user would export them for MinIO or AWS."""
    for k, v in s3_service.env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)
    return s3_service


@pytest.fixture(scope="session")
def tiny_teacher_spec(tmp_path_factory) -> str:
    """An (untrained) embedded OpenCLIP teacher saved to a file: the teacher spec tests pass."""
    import torch

    from fewshot.clip.teacher import create_embedded_model, save_embedded_teacher

    torch.manual_seed(0)
    model, name = create_embedded_model()
    path = save_embedded_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", model, model_name=name)
    return f"embedded:{path}"


@pytest.fixture(scope="module")
def local_ray():
    """A Ray cluster of this test module's own (never one already running on the machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._fewshot_exitstatus = int(session.exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's own exit status once its report is written: a CI run at
    705e90b passed all 394 tests and then segfaulted in native teardown at interpreter exit
    (make: Segmentation fault), which turned a green run red. Every service a test started is
    stopped by that test, so nothing is left for atexit handlers to do. A run that never
    finished a session (a usage error) exits as pytest would."""
    status = getattr(config, "_fewshot_exitstatus", None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
