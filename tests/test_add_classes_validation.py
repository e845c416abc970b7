"""add_classes rejects bad input with a clear error, exit code 2, and an untouched registry.

Runs against a real MLflow tracking server (sqlite store) with a registered champion.
"""

import pytest

from fewshot import registry
from fewshot.add_classes import AddClassesError, AddClassesOptions, validate
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
    job = load_job("add_classes")
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
