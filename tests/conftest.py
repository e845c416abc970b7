"""Shared fixtures: a tiny embedded world in a temporary catalog; a real MLflow server."""
from __future__ import annotations

import pytest

from catalog import Catalog
from catalog.world import build_world
from services import mlflow_server


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory) -> Catalog:
    catalog = Catalog(tmp_path_factory.mktemp("catalog"))
    build_world(catalog, n_train=120, n_val=20, n_test=30, seed=0, progress=False)
    return catalog


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
