"""Bring your own data, end to end at tiny scale: import Pascal VOC (BCCD), train a base model
on two of its classes with Ray Train, then add the third with add_classes.

Real Ray (a local cluster), a real MLflow server, real pycocotools evaluation.
"""
import json
from pathlib import Path

import pytest

from catalog import Catalog
from catalog.importers import import_voc
from fewshot.backends import registry
from fewshot.workflows.add_classes import AddClassesOptions, run_add_classes
from fewshot.workflows.base_train import BaseTrainOptions, run_base_training
from fewshot.backends.cluster import ClusterOptions
from fewshot.learning.loop import TrainConfig
from fewshot.workflows.options import StoreOptions


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

    store = StoreOptions(catalog=str(catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL)
    base = run_base_training(BaseTrainOptions(
        dataset="bccd", classes=("RBC", "WBC"), store=store,
        train=TrainConfig(steps=6, batch_size=2, warmup_steps=2, log_every=3),
        cluster=ClusterOptions(num_workers=1, cpus_per_worker=1), max_test_images=10))
    assert base.version == 1 and base.classes == ["RBC", "WBC"]
    assert base.tags["dataset"] == "bccd" and "bAP50" in base.tags

    result = run_add_classes(AddClassesOptions(
        classes=("Platelets",), shots=2, store=store,
        train=TrainConfig(steps=4, batch_size=2, warmup_steps=1, log_every=2),
        cluster=ClusterOptions(cpus_per_worker=1), max_val_images=10, max_test_images=10,
        max_base_drop=1.0, max_detector_drop=1.0, bias_correction=None))  # the correction off
    child = registry.get_version(mlflow_uri, MODEL, result.version.version)
    assert child.version == 2 and child.parent_version == 1
    assert child.classes == ["RBC", "WBC", "Platelets"]
    assert child.tags["new_classes"] == "Platelets" and child.tags["dataset"] == "bccd"
    assert "bias_correction_offset" not in child.tags and "bias_correction" not in result.timings
    # --scoring auto (the default) still chose the scoring on val, at offset 0, against --max-base-drop
    assert child.tags["scoring_option"] == "auto" and "scoring" in result.timings
    candidates = json.loads(child.tags["scoring_val"])
    assert [c["offset"] for c in candidates] == [0.0, 0.0] and all(c["met"] for c in candidates)
    assert child.tags["scoring"] in ("joint", "per-increment")
    assert registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version == 2
