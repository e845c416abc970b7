"""Bring your own data, end to end at tiny scale: import Pascal VOC (BCCD), train a base model
on two of its classes with Ray Train, then add the third with add_classes.

Real Ray (a local cluster), a real MLflow server, real pycocotools evaluation.
"""
from pathlib import Path

import pytest

from catalog import Catalog
from catalog.importers import import_voc
from fewshot import registry
from fewshot.add_classes import AddClassesOptions, run_add_classes
from fewshot.base_training import BaseTrainOptions, run_base_training
from fewshot.training import TrainConfig


BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bccd"
MODEL = "bccd-detector"
pytestmark = pytest.mark.integration


def test_base_then_add_classes_on_imported_voc(tmp_path, mlflow_uri, local_ray):
    if not BCCD.is_dir():
        pytest.skip(f"real datasets not found at {BCCD.parent} (clone shared/ beside the repo)")
    catalog = Catalog(tmp_path / "catalog")
    import_voc(catalog, "bccd", BCCD)
    manifest = catalog.manifest("bccd")
    assert {c.name for c in manifest.categories} == {"RBC", "WBC", "Platelets"}

    base = run_base_training(BaseTrainOptions(
        catalog_root=str(catalog.root), dataset="bccd", mlflow_uri=mlflow_uri,
        base_classes=["RBC", "WBC"], train=TrainConfig(steps=6, batch_size=2, warmup_steps=2, log_every=3),
        num_workers=1, model_name=MODEL, max_eval_images=10))
    assert base.version == 1 and base.classes == ["RBC", "WBC"]
    assert base.tags["dataset"] == "bccd" and "bAP50" in base.tags

    result = run_add_classes(AddClassesOptions(
        catalog_root=str(catalog.root), mlflow_uri=mlflow_uri, classes=["Platelets"], shots=2,
        train=TrainConfig(steps=4, batch_size=2, warmup_steps=1, log_every=2),
        cpus_per_worker=1, model_name=MODEL, max_eval_images=10, max_base_drop=1.0))
    child = registry.get_version(mlflow_uri, MODEL, result.version.version)
    assert child.version == 2 and child.parent_version == 1
    assert child.classes == ["RBC", "WBC", "Platelets"]
    assert child.tags["new_classes"] == "Platelets" and child.tags["dataset"] == "bccd"
    assert registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version == 2
