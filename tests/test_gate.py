"""The promotion gate's rule, the version's description, and the serialised compare-and-set
that moves ``champion`` (a real local Ray cluster and a real MLflow server)."""
import threading

import mlflow
import pytest

from catalog.class_sets import make_class_set, save_class_set
from fewshot.backends import promotion, registry
from fewshot.workflows.gate import GateFigures, GateRule, describe_version
from fewshot.workflows.promote import PromoteError, PromoteOptions, run_promote
from fewshot.workflows.options import StoreOptions
from services import load_job, register_champion

MODEL = "gate-detector"


def _figures(parent_served, child_served, parent_raw, child_raw, child_refined=True):
    return GateFigures(split="val", images=50, parent_served=parent_served, child_served=child_served,
                       parent_unrefined=parent_raw, child_unrefined=child_raw, parent_refined=False,
                       child_refined=child_refined, child_nAP50=0.3)


def test_a_refiner_cannot_hide_a_detector_that_forgot():
    # the child's refiner lifts its served base AP50 back to the parent's, but the detector
    # alone lost 20 points: refused by default ...
    hidden = _figures(parent_served=0.50, child_served=0.49, parent_raw=0.50, child_raw=0.30)
    passed, reason = GateRule().decide(hidden)
    assert not passed and "the detector forgot the base classes" in reason and "refiner hides" in reason
    assert "-0.2000" in reason and "-0.0100" in reason  # both changes are in the words
    # ... and accepted when the user allows the detector to drop that far
    passed, reason = GateRule(max_detector_drop=0.25).decide(hidden)
    assert passed and reason.startswith("passed")


def test_like_for_like_judges_what_users_lose():
    # a refined parent followed by an unrefined child: as served the base classes lose 15 points
    lost = GateFigures(split="val", images=50, parent_served=0.65, child_served=0.50, parent_unrefined=0.50,
                       child_unrefined=0.50, parent_refined=True, child_refined=False, child_nAP50=0.2)
    passed, reason = GateRule().decide(lost)
    assert not passed and "lost too much as served" in reason and "(refined parent)" in reason
    assert lost.to_dict()["served_change"] == pytest.approx(-0.15)


def test_the_description_says_what_and_why():
    class Report:
        nAP50, bAP50, nAP, bAP = 0.4, 0.5, 0.2, 0.3

    fig = _figures(0.5, 0.49, 0.5, 0.48)
    passed, reason = GateRule().decide(fig)
    text = describe_version(["gear", "star4"], 3, 5, passed, reason, fig, Report(), "test")
    assert text.startswith("Adds gear, star4 (5 shots each) to version 3. Gate passed on 50 val images")
    assert "Reported on test: nAP50 0.400" in text


@pytest.fixture(scope="module")
def versions(tiny_catalog, mlflow_uri, tmp_path_factory, local_ray):
    """Version 1 (champion) and versions 2, 3 registered from it (no alias yet)."""
    v1 = register_champion(tiny_catalog, mlflow_uri, MODEL, tmp_path_factory.mktemp("v1") / "detector.pt", "gate")
    base_set = make_class_set("synthworld", v1.classes)
    save_class_set(tiny_catalog, base_set)
    registry.tag_version(mlflow_uri, MODEL, 1, {"class_set": base_set.id})
    path = registry.download_checkpoint(mlflow_uri, MODEL, 1, tmp_path_factory.mktemp("dl"))
    out = [v1]
    with mlflow.start_run():
        for n in (2, 3):
            cs = make_class_set("synthworld", v1.classes + [f"extra{n}"])
            save_class_set(tiny_catalog, cs)
            out.append(registry.register_detector(mlflow_uri, MODEL, path, classes=v1.classes + [f"extra{n}"],
                                                  class_set=cs.id, parent_version=1, shots=2,
                                                  extra_tags={"dataset": "synthworld",
                                                              promotion.INCOMPLETE_TAG: "true"}))
    return out


def test_concurrent_promotions_from_the_same_parent_move_the_champion_once(mlflow_uri, versions):
    results = {}

    def go(v):
        results[v] = promotion.promote(mlflow_uri, MODEL, v, expected_champion=1, want_champion=True,
                                       reason="passed: test")

    threads = [threading.Thread(target=go, args=(v,)) for v in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [v for v, d in results.items() if d.promoted]
    assert len(winners) == 1, results
    loser = ({2, 3} - set(winners)).pop()
    assert results[loser].alias == "candidate" and f"champion moved to v{winners[0]}" in results[loser].reason
    assert registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version == winners[0]
    for v in (2, 3):
        tags = registry.get_version(mlflow_uri, MODEL, v).tags
        assert promotion.INCOMPLETE_TAG not in tags and tags["promotion"] in ("champion", "candidate")
    assert "champion moved" in registry.get_version(mlflow_uri, MODEL, loser).tags["promotion_reason"]


def test_rollback_and_manual_promotion_record_who_and_why(tiny_catalog, mlflow_uri, versions, monkeypatch):
    monkeypatch.setenv("FEWSHOT_USER", "alice")
    store = StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL)
    champion = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version
    decision = run_promote(PromoteOptions(rollback=True, reason="v2/v3 miss gears", store=store))
    assert decision.promoted and decision.version == 1 and decision.champion_before == champion
    v1 = registry.get_version(mlflow_uri, MODEL, 1)
    assert "champion" in v1.aliases and v1.tags["promoted_by"] == "alice"
    assert v1.tags["promotion_kind"] == "rollback" and "v2/v3 miss gears" in v1.tags["promotion_reason"]
    with pytest.raises(PromoteError, match="is a base model"):
        run_promote(PromoteOptions(rollback=True, reason="again", store=store))
    with pytest.raises(PromoteError, match="already the champion"):
        run_promote(PromoteOptions(version=1, reason="same", store=store))
    with pytest.raises(PromoteError, match="--reason is required"):
        run_promote(PromoteOptions(version=champion, store=store))
    # the job: exit code 0, then 2 for a version that does not exist
    job = load_job("promote")
    args = ["--catalog", str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL]
    assert job.main(["--version", str(champion), "--reason", "back again", *args]) == 0
    assert registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version == champion
    assert job.main(["--version", "99", "--reason", "nope", *args]) == 2


def test_promotion_refuses_a_class_set_the_catalog_does_not_know(tiny_catalog, mlflow_uri, versions,
                                                                  tmp_path_factory):
    path = registry.download_checkpoint(mlflow_uri, MODEL, 1, tmp_path_factory.mktemp("dl2"))
    with mlflow.start_run():
        foreign = registry.register_detector(mlflow_uri, MODEL, path, classes=["a", "b"], class_set="cs-elsewhere",
                                             parent_version=1, shots=1, extra_tags={"dataset": "synthworld"})
        unfinished = registry.register_detector(mlflow_uri, MODEL, path, classes=versions[0].classes,
                                                class_set=versions[0].class_set, parent_version=1, shots=1,
                                                extra_tags={promotion.INCOMPLETE_TAG: "true"})
    store = StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL)
    before = registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version
    with pytest.raises(PromoteError, match="not in the catalog"):
        run_promote(PromoteOptions(version=foreign.version, reason="try", store=store))
    with pytest.raises(PromoteError, match="unfinished"):
        run_promote(PromoteOptions(version=unfinished.version, reason="try", store=store))
    assert registry.get_alias(mlflow_uri, MODEL, registry.CHAMPION).version == before
