"""add_classes rejects bad input with a clear error, exit code 2, and an untouched registry.

Runs against a real MLflow tracking server (sqlite store) with a registered champion.
"""

import pytest

from fewshot.backends import registry
from fewshot.learning.method import MethodOptions
from fewshot.workflows.add_classes import AddClassesError, AddClassesOptions, validate
from fewshot.workflows.options import StoreOptions
from services import load_job, register_champion

MODEL = "validation-detector"


@pytest.fixture(scope="module")
def champion(tiny_catalog, mlflow_uri, tmp_path_factory):
    v = register_champion(tiny_catalog, mlflow_uri, MODEL,
                          tmp_path_factory.mktemp("ckpt") / "detector.pt", "validation")
    return {"version": v, "split": tiny_catalog.manifest("synthworld").class_split("split1")}


def _registry_state(uri):
    versions = registry.list_versions(uri, MODEL)
    return [(v.version, sorted(v.aliases), sorted(v.tags.items())) for v in versions]


def _opts(tiny_catalog, mlflow_uri, classes, shots=2, model=MODEL, **kwargs):
    return AddClassesOptions(classes=tuple(classes), shots=shots, max_val_images=4, max_test_images=4,
                             store=StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri,
                                                model_name=model), **kwargs)


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
    job = load_job("add_classes")
    code = job.main(["--classes", ",".join(classes), "--shots", str(shots), "--catalog",
                     str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL])
    assert code == 2
    assert _registry_state(mlflow_uri) == before
    champ = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION)
    assert champ.version == champion["version"].version
    assert registry.get_alias(mlflow_uri, MODEL, registry.CANDIDATE) is None


def test_missing_champion_is_a_clear_error(tiny_catalog, mlflow_uri):
    with pytest.raises(AddClassesError, match="run jobs/base_train.py first"):
        validate(_opts(tiny_catalog, mlflow_uri, ["triangle"], model="never-registered"))


@pytest.mark.parametrize("method, expected", [
    (MethodOptions(balancer="pgb", freeze="head"), "--balancer pgb act on the shared RoI feature"),
    (MethodOptions(distill_beta=0.5, teacher="embedded", freeze="head"), "--distill-beta 0.5 act on the shared RoI feature"),
    (MethodOptions(distill_beta=0.5, freeze="backbone"), "needs a CLIP teacher"),
    (MethodOptions(balancer="gradnorm", freeze="rpn"), "does not train with --freeze rpn"),
])
def test_a_method_that_would_do_nothing_is_refused(method, expected, tiny_catalog, mlflow_uri, champion):
    novel = list(champion["split"].novel[:1])
    before = _registry_state(mlflow_uri)
    with pytest.raises(AddClassesError, match=expected):
        validate(_opts(tiny_catalog, mlflow_uri, novel, method=method))
    assert _registry_state(mlflow_uri) == before


@pytest.mark.parametrize("drop", [-0.01, 1.0, 5.0])
def test_a_bias_correction_outside_0_to_1_is_refused(drop, tiny_catalog, mlflow_uri, champion):
    before = _registry_state(mlflow_uri)
    with pytest.raises(AddClassesError, match="--bias-correction is a drop of base AP50"):
        validate(_opts(tiny_catalog, mlflow_uri, list(champion["split"].novel[:1]), bias_correction=drop))
    assert _registry_state(mlflow_uri) == before


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_a_pseudo_label_threshold_outside_0_to_1_is_refused(threshold, tiny_catalog, mlflow_uri, champion):
    before = _registry_state(mlflow_uri)
    with pytest.raises(AddClassesError, match="--pseudo-labels is a detection score threshold"):
        validate(_opts(tiny_catalog, mlflow_uri, list(champion["split"].novel[:1]), pseudo_labels=threshold))
    assert _registry_state(mlflow_uri) == before


def test_the_plan_carries_what_validation_read(tiny_catalog, mlflow_uri, champion):
    novel = list(champion["split"].novel[:2])
    plan = validate(_opts(tiny_catalog, mlflow_uri, novel))
    try:
        assert plan.parent_ckpt.classes == plan.parent.classes
        assert plan.train_table.num_rows == tiny_catalog.manifest("synthworld").splits["train"]
        assert len(plan.val.rows) == 4 and plan.test is not None and len(plan.test.rows) == 4
        assert plan.val.novel_ids == plan.new_ids and plan.method.freeze == "backbone"
        assert plan.work.is_dir()
    finally:
        import shutil

        shutil.rmtree(plan.work, ignore_errors=True)
