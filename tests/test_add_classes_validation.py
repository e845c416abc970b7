"""add_classes rejects bad input with a clear error, exit code 2, and an untouched registry.

Runs against a real MLflow tracking server (sqlite store) with a registered champion.
"""
import importlib.util
from pathlib import Path

import mlflow
import pytest
import torch

from fewshot import registry
from fewshot.add_classes import AddClassesError, AddClassesOptions, validate
from fewshot.checkpoint import save_checkpoint
from fewshot.config import preset
from fewshot.detector import build_detector

MODEL = "validation-detector"


def _load_job():
    path = Path(__file__).resolve().parents[1] / "jobs" / "add_classes.py"
    spec = importlib.util.spec_from_file_location("add_classes_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def champion(tiny_catalog, mlflow_uri, tmp_path_factory):
    manifest = tiny_catalog.manifest("synthworld")
    split = manifest.class_split("split1")
    classes = list(split.base)
    ids = [manifest.category_by_name()[c].id for c in classes]
    cfg = preset("cpu-small")
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "detector.pt",
                           build_detector(cfg, len(classes) + 1), cfg, classes, ids,
                           "synthworld", "cs-test")
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("validation")
    with mlflow.start_run():
        v = registry.register_detector(mlflow_uri, MODEL, path, classes=classes, class_set="cs-test",
                                       parent_version=None, shots=None,
                                       extra_tags={"dataset": "synthworld"})
    registry.set_alias(mlflow_uri, MODEL, registry.CHAMPION, v.version)
    return {"version": v, "split": split}


def _registry_state(uri):
    versions = registry.list_versions(uri, MODEL)
    return [(v.version, sorted(v.aliases), sorted(v.tags.items())) for v in versions]


def _opts(tiny_catalog, mlflow_uri, classes, shots=2):
    return AddClassesOptions(catalog_root=str(tiny_catalog.root), mlflow_uri=mlflow_uri,
                             classes=classes, shots=shots, model_name=MODEL)


def test_valid_request_passes_validation(tiny_catalog, mlflow_uri, champion):
    novel = list(champion["split"].novel[:2])
    plan = validate(_opts(tiny_catalog, mlflow_uri, novel))
    assert plan.parent.version == champion["version"].version
    assert plan.new_classes == novel and plan.dataset == "synthworld"


@pytest.mark.parametrize("case", ["unknown", "duplicate_in_set", "repeated_arg", "too_few", "no_shots"])
def test_bad_input_is_rejected_and_registry_untouched(case, tiny_catalog, mlflow_uri, champion):
    base, novel = champion["split"].base, champion["split"].novel
    classes, shots, expected = {
        "unknown": ([novel[0], "dodecahedron"], 2, "unknown class"),
        "duplicate_in_set": ([novel[0], base[0]], 2, "already in the champion class set"),
        "repeated_arg": ([novel[0], novel[0]], 2, "more than once"),
        "too_few": ([novel[0]], 10_000, "too few annotated instances"),
        "no_shots": ([novel[0]], 0, "--shots must be at least 1"),
    }[case]
    before = _registry_state(mlflow_uri)
    with pytest.raises(AddClassesError, match=expected):
        validate(_opts(tiny_catalog, mlflow_uri, classes, shots))
    job = _load_job()
    code = job.main(["--classes", ",".join(classes), "--shots", str(shots), "--catalog",
                     str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL])
    assert code == 2
    assert _registry_state(mlflow_uri) == before
    champ = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    assert champ.version == champion["version"].version
    assert registry.get_alias(mlflow_uri, MODEL, registry.CANDIDATE) is None


def test_missing_champion_is_a_clear_error(tiny_catalog, mlflow_uri):
    opts = _opts(tiny_catalog, mlflow_uri, ["triangle"])
    opts.model_name = "never-registered"
    with pytest.raises(AddClassesError, match="run jobs/base_train.py first"):
        validate(opts)
