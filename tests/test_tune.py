"""Ray Tune over add_classes fine-tuning, end to end at tiny scale.

A local Ray cluster started here, a real MLflow server (conftest), an untrained tiny champion:
``jobs/tune.py`` runs a 3-trial ASHA search and must leave one parent run with one nested run
per trial (params and a step-indexed val curve each) and a best configuration that
``fewshot.backends.tuned_configs.load_config("best", ...)`` returns.
"""
import json
from pathlib import Path

import mlflow
import pytest

from fewshot.backends import ray_tune as space, registry
from fewshot.backends.cluster import ClusterOptions
from fewshot.learning.loop import TrainConfig
from fewshot.learning.method import MethodOptions
from fewshot.workflows import tune as tuning
from fewshot.workflows.add_classes import AddClassesOptions, run_add_classes
from fewshot.workflows.options import StoreOptions
from fewshot.backends.tuned_configs import BEST_CONFIG_TAG, TUNABLE_KEYS, apply_to, load_config, normalize_config
from services import load_job, register_champion

MODEL = "tune-detector"
EXPERIMENT = "tune-test"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def champion(tiny_catalog, mlflow_uri, tmp_path_factory):
    v = register_champion(tiny_catalog, mlflow_uri, MODEL,
                          tmp_path_factory.mktemp("ckpt") / "detector.pt", "tune-champion")
    return {"version": v, "split": tiny_catalog.manifest("synthworld").class_split("split1")}


def _in_space(config: dict, max_steps: int, eval_every: int, distill: bool) -> None:
    """A sampled configuration, or add_classes' defaults (the search's first trial)."""
    assert set(config) == set(TUNABLE_KEYS) | {"freeze", "parent_distill"}
    assert config["freeze"] == "backbone"
    if config == tuning.default_trial(max_steps):
        return
    assert config["balancer"] in ("fixed", "pgb", "gradnorm")
    assert space.MOMENTUM_RANGE[0] <= config["balancer_momentum"] < space.MOMENTUM_RANGE[1]
    assert config["distill_beta"] in (space.BETAS if distill else (0.0,))
    assert config["parent_distill"] in space.PARENT_DISTILL_WEIGHTS
    assert space.LR_RANGE[0] <= config["lr"] <= space.LR_RANGE[1]
    assert config["steps"] in space.step_choices(max_steps, eval_every)


def test_search_logs_nested_runs_and_stores_best(tiny_catalog, mlflow_uri, champion, local_ray, tmp_path,
                                                 tiny_teacher_spec):
    distill = True
    novel = list(champion["split"].novel[:2])
    max_steps, eval_every, samples = 4, 2, 3
    code = load_job("tune").main([
        "--catalog", str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL,
        "--experiment", EXPERIMENT, "--classes", ",".join(novel), "--shots", "2",
        "--num-samples", str(samples), "--max-concurrent", "1", "--cpus-per-worker", "1",
        "--max-steps", str(max_steps), "--eval-every", str(eval_every), "--grace-period", "2",
        "--batch-size", "2", "--val-images", "20", "--teacher", tiny_teacher_spec,
        "--storage-path", str(tmp_path / "ray_results"), "--quiet", "--draws", "2",
    ])
    assert code == 0

    client = registry.client(mlflow_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], "tags.job = 'tune'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune_split"] == "val"
    assert parent.data.params["draws"] == "2"
    assert json.loads(parent.data.params["classes"]) == novel

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == samples
    # trial 0 is add_classes' defaults (its freeze policy, no balancer, steps capped at
    # --max-steps); the others are sampled under the search's --freeze
    default = tuning.default_trial(max_steps)
    assert json.loads(parent.data.params["default_trial"]) == default
    first = [c for c in children if c.data.tags["mlflow.runName"].startswith("trial-00-")]
    assert len(first) == 1
    assert first[0].data.params["freeze"] == AddClassesOptions().method.freeze == "backbone"
    assert first[0].data.params["balancer"] == "none"
    assert first[0].data.params["lr"] == str(default["lr"]) and first[0].data.params["steps"] == str(max_steps)
    for child in children:
        params = child.data.params
        assert {"balancer", "balancer_momentum", "distill_beta", "lr", "steps", "freeze"} <= set(params)
        assert params["freeze"] == "backbone"
        history = client.get_metric_history(child.info.run_id, "val/HM50")
        assert history, f"trial run {child.info.run_id} has no val curve"
        steps = [m.step for m in history]
        assert steps == sorted(steps) and steps[0] == eval_every
        assert all(0.0 <= m.value <= 1.0 for m in history)
        assert client.get_metric_history(child.info.run_id, "val/HM")
        # every sampled trial has a balancer: the weights it applied are logged with the curve
        weights = client.get_metric_history(child.info.run_id, "train/w_cls")
        assert (not weights) if child is first[0] else (weights and all(m.value > 0 for m in weights))
        assert child.data.tags["tune.outcome"] in ("completed", "early_stopped")
        assert child.info.status == "FINISHED"

    # --max-concurrent 1: one trial after the other
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), spans

    # the best configuration is stored on the registered model and loads back
    tags = client.get_registered_model(MODEL).tags
    assert tags[BEST_CONFIG_TAG] == parent.info.run_id
    config, source = load_config("best", mlflow_uri, MODEL)
    assert source == f"tune:{parent.info.run_id}"
    _in_space(config, max_steps, eval_every, distill)
    best_params = {k[len("best."):]: v for k, v in parent.data.params.items() if k.startswith("best.")}
    assert best_params["lr"] == str(config["lr"]) and best_params["steps"] == str(config["steps"])
    assert "best_val_HM50" in parent.data.metrics

    # the record says what it was tuned for
    local = client.download_artifacts(parent.info.run_id, "best_config.json", str(tmp_path))
    record = json.loads(Path(local).read_text())
    assert record["tuned_for"]["classes"] == novel and record["tuned_for"]["shots"] == 2
    assert record["tuned_for"]["freeze"] == "backbone" and "HM50" in record["metrics"]

    # add_classes --tuned-config best fine-tunes with it, and the new version says which it was
    result = run_add_classes(AddClassesOptions(
        classes=tuple(novel), shots=2,
        store=StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL),
        train=TrainConfig(steps=99, batch_size=2, lr=0.5, warmup_steps=1, log_every=1),
        tuned_config="best", method=MethodOptions(teacher=tiny_teacher_spec, refine=False),
        max_val_images=5, max_test_images=5,
        max_base_drop=-1.0,  # never promoted: the champion stays the base model for the next tests
        cluster=ClusterOptions(cpus_per_worker=1, storage_path=str(tmp_path / "add"))))
    assert not result.promoted
    version_tags = registry.get_version(mlflow_uri, MODEL, result.version.version).tags
    assert version_tags["config_source"] == f"tune:{parent.info.run_id}"
    applied = json.loads(version_tags["config"])
    for key in TUNABLE_KEYS:
        assert applied[key] == config[key], key
    assert version_tags["freeze"] == config["freeze"]  # what the winning trial trained with

    # a file works too, as a record or as a flat mapping
    as_file = tmp_path / "tuned.json"
    as_file.write_text(json.dumps(record))
    assert load_config(str(as_file), mlflow_uri, MODEL) == (config, f"file:{as_file.resolve()}")
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"lr": 1e-3, "balancer": "none"}))
    assert load_config(str(flat), mlflow_uri, MODEL)[0] == {"lr": 1e-3, "balancer": None}


def test_a_trial_scores_the_mean_over_its_draws(tiny_catalog, mlflow_uri, champion, monkeypatch):
    """Each trial fine-tunes on every support draw; what it reports at each step is the mean of
    the draws' val figures (the same figures each draw gives alone)."""
    from dataclasses import replace

    opts = tuning.TuneOptions(
        store=StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL),
        classes=tuple(champion["split"].novel[:2]), shots=2, cluster=ClusterOptions(cpus_per_worker=1),
        batch_size=2, teacher=None, draws=2, val_images=20, eval_every=2, max_steps=4)
    payload = tuning._payload(tuning._prepare(opts), opts)
    assert [d.seed for d in payload.draws] == [0, tuning.DRAW_SEED_STRIDE]
    support = [sorted(r["image_id"] for r in d.rows) for d in payload.draws]
    assert support[0] != support[1]
    reports: list[dict] = []
    monkeypatch.setattr(space.tune, "report", reports.append)
    config = {"balancer": "pgb", "balancer_momentum": 0.8, "distill_beta": 0.0, "lr": 1e-2, "steps": 4}
    space.run_trial(config, payload)
    together, alone = list(reports), []
    for draw in payload.draws:
        reports.clear()
        space.run_trial(config, replace(payload, draws=[draw]))
        alone.append(list(reports))
    assert [r["step"] for r in together] == [2, 4] and {r["draws"] for r in together} == {2}
    for k, r in enumerate(together):
        for key in space.VAL_KEYS:
            assert r[key] == pytest.approx((alone[0][k][key] + alone[1][k][key]) / 2, abs=1e-9), key
    with pytest.raises(tuning.TuneError, match="--draws"):
        replace(opts, draws=0).check()


def test_trials_that_train_the_box_head_get_the_pseudo_labelled_rows(tiny_catalog, mlflow_uri, champion):
    """Each draw carries its rows as sampled and with the parent's old-class pseudo-labels; a
    trial under --freeze head trains on the former (as add_classes does), the others on the latter."""
    from fewshot.learning.method import MethodConfig

    opts = tuning.TuneOptions(
        store=StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL),
        classes=tuple(champion["split"].novel[:2]), shots=2, cluster=ClusterOptions(cpus_per_worker=1),
        batch_size=2, teacher=None, draws=1, val_images=20, pseudo_labels=0.05)
    draw = tuning._payload(tuning._prepare(opts), opts).draws[0]
    assert [r["image_id"] for r in draw.pseudo_rows] == [r["image_id"] for r in draw.rows]
    for plain, labelled in zip(draw.rows, draw.pseudo_rows):   # the user's boxes first, unchanged
        n = len(plain["boxes"])
        assert labelled["boxes"][:n] == plain["boxes"] and labelled["category_ids"][:n] == plain["category_ids"]
        by_name = tiny_catalog.manifest("synthworld").category_by_name()
        assert set(labelled["category_ids"][n:]) <= {by_name[c].id for c in champion["split"].base}
    assert sum(len(l["boxes"]) - len(p["boxes"]) for p, l in zip(draw.rows, draw.pseudo_rows)) > 0
    assert draw.rows_for(MethodConfig(freeze="head")) is draw.rows
    assert draw.rows_for(MethodConfig(freeze="backbone")) is draw.pseudo_rows
    assert draw.rows_for(MethodConfig(freeze="rpn")) is draw.pseudo_rows
    off = tuning._payload(tuning._prepare(opts), tuning.replace(opts, pseudo_labels=None)).draws[0]
    assert off.pseudo_rows is None and off.rows_for(MethodConfig(freeze="backbone")) is off.rows


def test_compare_best_and_default_on_test(tiny_catalog, mlflow_uri, champion, local_ray, tmp_path):
    """--compare-seeds' machinery at tiny scale (2 seeds, 2-step fine-tunes, 10 test images)."""
    opts = tuning.TuneOptions(
        store=StoreOptions(catalog=str(tiny_catalog.root), mlflow_uri=mlflow_uri, model_name=MODEL),
        classes=tuple(champion["split"].novel[:2]), shots=2, cluster=ClusterOptions(cpus_per_worker=1),
        batch_size=2, teacher=None, compare_seeds=2, test_images=10)
    prep = tuning._prepare(opts)
    tiny = {"balancer": "pgb", "balancer_momentum": 0.8, "distill_beta": 0.0, "lr": 1e-3, "steps": 2}
    comp = tuning.compare_configs(prep, opts, tiny, default={**tuning.default_config(), "steps": 2})
    assert comp.seeds == [1, 2] and comp.split == "test"
    for table in (comp.best, comp.default):
        assert len(table["HM"]) == 2 and all(0.0 <= v <= 1.0 for v in table["HM"])
        assert table["summary"]["HM"]["mean"] == pytest.approx(sum(table["HM"]) / 2)
    diffs = [b - d for b, d in zip(comp.best["HM50"], comp.default["HM50"])]
    assert comp.paired["HM50"]["mean"] == pytest.approx(sum(diffs) / 2)
    mlflow.set_experiment("tune-compare")
    with mlflow.start_run() as run:
        tuning.log_comparison(comp)
    logged = registry.client(mlflow_uri).get_run(run.info.run_id).data.metrics
    assert "compare_best_test_HM_mean" in logged and "compare_default_test_HM_ci95" in logged
    assert logged["compare_paired_test_HM50_mean"] == pytest.approx(comp.paired["HM50"]["mean"])


def test_load_config_errors(tiny_catalog, mlflow_uri, champion, tmp_path):
    registry.client(mlflow_uri).create_registered_model("never-tuned")
    with pytest.raises(ValueError, match="no tuned config stored"):
        load_config("best", mlflow_uri, "never-tuned")
    with pytest.raises(ValueError, match="not found"):
        load_config("best", mlflow_uri, "no-such-model")
    with pytest.raises(ValueError, match="not found"):
        load_config(str(tmp_path / "missing.json"), mlflow_uri, MODEL)
    bad = tmp_path / "bad.json"
    for content, message in [({"lr": 1e-3, "lrr": 2}, "unknown config key"),
                             ({"balancer": "adam"}, "balancer"), ({"lr": -1}, "lr"),
                             ({"steps": 2.5}, "steps"), ({"balancer_momentum": 1.0}, "momentum"),
                             ({"lr": 1e-3, "freeze": "everything"}, "freeze"),
                             ({}, "empty config")]:
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            load_config(str(bad), mlflow_uri, MODEL)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(str(bad), mlflow_uri, MODEL)
    with pytest.raises(ValueError, match="lacks"):
        normalize_config({"lr": 1e-3}, require_all=True)


def test_a_config_may_name_its_freezing_policy():
    """A tuned config carries ``freeze`` when its trial named one (add_classes' defaults trial:
    'backbone'); applying it sets the policy, and a config without it keeps the caller's."""
    full = {**tuning.default_config(), "freeze": "head"}
    assert normalize_config(full, require_all=True) == full
    method, train = apply_to(full, MethodOptions(freeze="backbone"), TrainConfig())
    assert method.freeze == "head" and method.balancer is None and train.steps == full["steps"]
    method, _ = apply_to({"lr": 1e-3}, MethodOptions(freeze="backbone"), TrainConfig())
    assert method.freeze == "backbone"
    assert tuning.default_trial(100) == {**tuning.default_config(), "freeze": AddClassesOptions().method.freeze,
                                         "steps": min(100, AddClassesOptions().train.steps)}
    # the comparison is skipped only for the defaults themselves, not for a capped copy of them
    steps = AddClassesOptions().train.steps
    assert tuning._is_default(tuning.default_trial(steps))
    assert not tuning._is_default(tuning.default_trial(steps - 1))
    assert not tuning._is_default({**tuning.default_trial(steps), "freeze": "head"})


def test_parent_distillation_weight_is_searched_under_freeze_backbone():
    """lambda is a key of the space only under the policy add_classes applies it with; a config names it
    or leaves add_classes' default; a negative one is refused."""
    assert "parent_distill" in space.search_space(100, 25, freeze="backbone")
    assert "parent_distill" in space.search_space(100, 25, freeze="rpn-head")
    assert "parent_distill" not in space.search_space(100, 25, freeze="head")
    assert "parent_distill" not in space.search_space(100, 25, freeze="rpn")
    assert "parent_distill" not in space.search_space(100, 25, freeze="none")
    tuned = {**tuning.default_config(), "freeze": "backbone", "parent_distill": 3.0}
    assert normalize_config(tuned, require_all=True)["parent_distill"] == 3.0
    method, _ = apply_to(tuned, MethodOptions(freeze="head"), TrainConfig())
    assert method.parent_distill == 3.0 and method.applied_parent_distill == 3.0
    method, _ = apply_to({**tuned, "parent_distill": 0}, MethodOptions(), TrainConfig())
    assert method.applied_parent_distill == 0.0
    # a record written before lambda was a key: the caller's weight (add_classes' default) stays
    method, _ = apply_to({"lr": 1e-3, "freeze": "backbone"}, MethodOptions(parent_distill=1.0), TrainConfig())
    assert method.applied_parent_distill == 1.0
    with pytest.raises(ValueError, match="parent_distill"):
        normalize_config({**tuned, "parent_distill": -1})
    steps = AddClassesOptions().train.steps
    old_record = {k: v for k, v in tuning.default_trial(steps).items() if k != "parent_distill"}
    assert tuning._is_default(old_record)
    assert not tuning._is_default({**tuning.default_trial(steps), "parent_distill": 3.0})
    assert space._trial_name(3, tuned).startswith("trial-03-backbone-None-b0-pd3-lr")


def test_a_trial_without_lambda_summarises_to_a_config_that_applies():
    """A trial sampled under a policy with no lambda in its space (--freeze rpn) has no
    parent_distill: its summary leaves the key out (not None), so the best config it may become
    applies with the caller's weight."""
    from types import SimpleNamespace

    sampled = {"freeze": "rpn", "balancer": "fixed", "balancer_momentum": 0.9, "distill_beta": 0.0,
               "lr": 1e-3, "steps": 50}
    result = SimpleNamespace(metrics={"trial_id": "t1", "step": 50, "HM50": 0.5}, path=None,
                             config=sampled, error=None)
    (summary,) = space._summaries([result], SimpleNamespace(runs={}))
    assert summary.config == sampled and summary.completed
    method, train = apply_to(summary.config, MethodOptions(parent_distill=1.0), TrainConfig())
    assert method.freeze == "rpn" and method.parent_distill == 1.0 and train.steps == 50


def test_job_refuses_bad_options_before_starting_anything():
    job = load_job("tune")
    assert job.main(["--num-workers", "2", "--mlflow-uri", "http://127.0.0.1:1"]) == 2
    assert job.main(["--eval-every", "50", "--max-steps", "10", "--mlflow-uri", "http://127.0.0.1:1"]) == 2
    assert space.step_choices(150, 25) == [50, 75, 100, 150]
    assert tuning.default_config() == {"balancer": None, "balancer_momentum": 0.9, "distill_beta": 0.0,
                                       "lr": AddClassesOptions().train.lr, "steps": AddClassesOptions().train.steps,
                                       "parent_distill": AddClassesOptions().method.parent_distill}


def test_defaults_win_then_no_self_comparison(tiny_catalog, mlflow_uri, champion, local_ray, tmp_path,
                                              monkeypatch):
    """A search whose only trial is add_classes' defaults keeps them as the best configuration
    (freeze head) and does not fine-tune them against themselves for --compare-seeds."""
    from dataclasses import replace

    # add_classes' defaults with a 4-step schedule: the driver builds the trial's whole config
    # from them, so the trial actor trains 4 steps without being patched itself
    steps = 4
    defaults = AddClassesOptions()
    monkeypatch.setattr(tuning, "ADD_CLASSES_DEFAULTS", replace(defaults, train=replace(defaults.train, steps=steps)))
    experiment = "tune-defaults-only"
    code = load_job("tune").main([
        "--catalog", str(tiny_catalog.root), "--mlflow-uri", mlflow_uri, "--model-name", MODEL,
        "--experiment", experiment, "--classes", ",".join(champion["split"].novel[:2]), "--shots", "2",
        "--num-samples", "1", "--cpus-per-worker", "1", "--max-steps", str(steps), "--eval-every", "2",
        "--batch-size", "2", "--val-images", "20", "--teacher", "none", "--compare-seeds", "2",
        "--storage-path", str(tmp_path / "ray_results"), "--quiet", "--draws", "1",
    ])
    assert code == 0
    client = registry.client(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    parent = client.search_runs([exp.experiment_id], "tags.job = 'tune'")[0]
    assert parent.data.params["best.freeze"] == "backbone" and parent.data.params["best.balancer"] == "none"
    assert parent.data.tags["compare"].startswith("skipped")
    assert not any(k.startswith("compare_") for k in parent.data.metrics)
    config, _ = load_config("best", mlflow_uri, MODEL)
    assert config == tuning.default_trial(steps)
