"""The ablation: one (shots, seed) unit runs every variant on the same draw, and the job
runs units as Ray tasks, prints the table and logs it to a real MLflow server."""
import math

import mlflow
import pytest
import ray

from fewshot.learning.ablation import VARIANTS, UnitSpec, check_variants, run_unit
from fewshot.clip.refinement import DEFAULT_GRID
from fewshot.learning.loop import TrainConfig
from services import load_job, untrained_base_checkpoint


@pytest.fixture(scope="module")
def base_checkpoint(tiny_catalog, tmp_path_factory):
    return untrained_base_checkpoint(tiny_catalog, tmp_path_factory.mktemp("base") / "detector.pt")


def test_check_variants():
    check_variants(["baseline", "pgb", "gradnorm"], None)
    with pytest.raises(ValueError, match="unknown"):
        check_variants(["baseline", "magic"], "embedded")
    with pytest.raises(ValueError, match="teacher"):
        check_variants(["refine"], None)


def test_one_unit_runs_every_variant_on_the_same_draw(tiny_catalog, base_checkpoint, tiny_teacher_spec):
    from fewshot.model.checkpoint import load_checkpoint

    parent = load_checkpoint(base_checkpoint)
    spec = UnitSpec(catalog_root=str(tiny_catalog.root), dataset="synthworld",
                    new_classes=tuple(tiny_catalog.manifest("synthworld").class_split("split1").novel[:2]),
                    shots=1, seed=0, variants=tuple(VARIANTS),
                    train=TrainConfig(steps=2, batch_size=2, lr=1e-4, warmup_steps=1, log_every=2),
                    teacher_spec=tiny_teacher_spec, test_images=6, val_images=6)
    rows = run_unit(spec, parent)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    by = {r["variant"]: r for r in rows}
    for r in rows:
        assert 0.0 <= r["bAP50"] <= 1.0 and r["shots"] == 1 and r["seed"] == 0
    for name in ("refine", "all", "all-pseudo"):
        assert by[name]["fusion_weight"] in DEFAULT_GRID
    assert by["baseline"]["fusion_weight"] is None
    if by["refine"]["fusion_weight"] == 0.0:  # same model, refinement off: same figures
        assert by["refine"]["bAP50"] == by["baseline"]["bAP50"]
    # the refined variants also carry their detector's own figures: the same model unrefined
    assert by["refine"]["nAP50_unrefined"] == by["baseline"]["nAP50"]
    assert by["all"]["nAP50_unrefined"] == by["pgb-distill"]["nAP50"]
    assert by["all"]["bAP50_unrefined"] == by["pgb-distill"]["bAP50"]
    assert by["all-pseudo"]["nAP50_unrefined"] == by["pgb-distill-pseudo"]["nAP50"]
    for name in ("baseline", "pgb", "gradnorm", "distill", "pgb-distill", "pseudo", "pgb-distill-pseudo"):
        assert by[name]["nAP50_unrefined"] == by[name]["nAP50"]
    assert {n for n, r in by.items() if r["pseudo_label_threshold"] == 0.9} == {
        "pseudo", "pgb-distill-pseudo", "all-pseudo", "pseudo-parent", "pgb-distill-pseudo-parent"}
    assert {n for n, r in by.items() if r["parent_distill"] > 0} == {
        "parent", "pseudo-parent", "pgb-distill-pseudo-parent"}
    # every row is also scored after add_classes' bias correction, chosen on val against the
    # parent's val bAP50, scored once per draw: the parent's own figure on those val images
    from fewshot.learning.episode import score
    from fewshot.metrics.coco_eval import load_eval_split

    val = load_eval_split(tiny_catalog, "synthworld", "val", parent.classes, spec.new_classes, 6)
    parent_val = score(parent, val, device="cpu").bAP50
    assert all(r["parent_val_bAP50"] == pytest.approx(parent_val) for r in rows)
    for r in rows:
        assert r["offset"] <= 0 and isinstance(r["rule_met"], bool)
        assert 0.0 <= r["bAP50_corrected"] <= 1.0 and 0.0 <= r["parent_val_bAP50"] <= 1.0
        if r["offset"] == 0.0:   # no correction: the uncorrected detector's figures
            assert r["bAP50_corrected"] == r["bAP50_unrefined"]
        # per-increment scoring re-scores the same detector: a figure per row, in range
        assert 0.0 <= r["bAP50_per_increment"] <= 1.0 and 0.0 <= r["nAP50_per_increment"] <= 1.0
        # --scoring auto serves one of the two, each with its own offset (per-increment: none)
        same = {"joint": "_corrected", "per-increment": "_per_increment"}[r["scoring_auto"]]
        assert [r["bAP50_auto"], r["nAP50_auto"]] == pytest.approx([r[f"bAP50{same}"], r[f"nAP50{same}"]], nan_ok=True)


@pytest.mark.integration
def test_ablation_job_logs_the_table(tiny_catalog, base_checkpoint, tiny_teacher_spec, mlflow_uri,
                                     tmp_path, capsys):
    job = load_job("ablation")
    out = tmp_path / "table.md"
    try:
        code = job.main([
            "--catalog", str(tiny_catalog.root), "--checkpoint", str(base_checkpoint),
            "--mlflow-uri", mlflow_uri, "--shots", "1", "--seeds", "2",
            "--variants", "baseline,refine,all", "--steps", "2", "--batch-size", "2",
            "--test-images", "5", "--val-images", "5", "--teacher", tiny_teacher_spec,
            "--ray-address", "local", "--out", str(out),
        ])
    finally:
        ray.shutdown()
    assert code == 0
    text = capsys.readouterr().out
    assert "| variant | 1-shot nAP50 | 1-shot bAP50 |" in text and "| all |" in text
    assert "1-shot: all - baseline" in text
    assert "1-shot: bAP50 - parent's (" in text and "parent bAP50 " in text
    assert "after bias correction (offset chosen on 5 val images" in text
    assert "corrected: 1-shot: all - baseline" in text
    assert "the same detectors with per-increment scoring" in text and "per-increment: 1-shot: all - baseline" in text
    assert "as add_classes serves it by default (--scoring auto" in text and "auto: 1-shot: all - baseline" in text
    assert out.read_text().startswith("| variant |")
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("fewshot-ablation")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert run.data.tags["job"] == "ablation"
    assert not math.isnan(run.data.metrics["nAP50_baseline_1shot"])
    assert "nAP50_all_1shot_ci95" in run.data.metrics  # 2 seeds give an interval
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ablation.md", "ablation.png", "ablation_runs.json"} <= names
