"""Glue: Ray Tune over add_classes fine-tuning (balancer, its smoothing, distillation beta,
learning rate, steps), with one MLflow parent run and one nested run per trial.

What one search does (``jobs/tune.py`` is the command line):

1. On the driver: resolve ``models:/NAME@champion``, draw the K-shot support set of the new
   classes (:func:`fewshot.episode.sample_episode`, seed ``seed``), imprint the new classifier
   rows (:func:`fewshot.episode.expand_parent`), embed the support boxes with the CLIP teacher
   once (for the trials that distil), and load the first ``val_images`` images of the **val**
   split (the test split is never looked at while searching). All of it travels to the trials
   through the object store (``tune.with_parameters``), so trials need no shared disk.
2. Every trial (:func:`run_trial`, one Ray actor holding ``cpus_per_trial`` CPUs) fine-tunes
   that same expanded start with its sampled hyperparameters through
   :func:`fewshot.method.finetune`, whose logging callback scores the current weights on val
   every ``eval_every`` steps and calls ``ray.tune.report``. Configurations are drawn by Tune's
   random search seeded with ``seed`` (a rerun tries the same ones); the ASHA scheduler stops
   the trials whose validation figure trails at a rung.
3. A driver-side Tune callback (:class:`MlflowTrialLogger`) opens a nested MLflow run per trial
   (tag ``mlflow.parentRunId``), logs its hyperparameters as params and its validation curve as
   step-indexed metrics (``val/HM50``, ``val/HM``, ``val/bAP`` ...), so trials line up side by
   side in the MLflow UI; trials ASHA stopped are tagged ``tune.outcome=early_stopped``.
4. The best trial among those that ran all their steps (by the last reported validation
   figure) is logged to the parent run and stored with
   :func:`fewshot.tuned_configs.save_best_config` (artifact ``best_config.json`` plus the
   registered-model tag ``fewshot.best_config_run``) for ``add_classes --config best``.
5. Optionally (:func:`compare_configs`) the best and the default add_classes configuration are
   each fine-tuned on ``N`` fresh support draws and scored on the **test** split; mean HM with a
   95% t-interval goes to the parent run.

The scheduler's metric is ``HM50`` by default (``metric="HM"`` is available): on a small val
set, a few-shot fine-tune's novel AP at the strict IoU thresholds of AP@[.5:.95] is often
exactly zero for many steps, so HM is zero for many trials at once and ASHA's rung comparisons
become ties; AP50 already moves after a few steps and still ranks "learned the new classes
without forgetting the old" by the harmonic mean. Both are reported and logged every time.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import mlflow
import ray
import torch
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from catalog import Catalog
from fewshot import registry, tracking
from fewshot.add_classes import AddClassesError, AddClassesOptions, validate
from fewshot.checkpoint import DetectorCheckpoint, load_checkpoint
from fewshot.episode import expand_parent, sample_episode, score, to_checkpoint
from fewshot.evaluation import EvalReport, EvalSplit, load_eval_split
from fewshot.freezing import POLICIES
from fewshot.method import BALANCERS, MethodConfig, TeacherEmbedder, finetune
from fewshot.stats import mean_ci95
from fewshot.training import TrainConfig
from fewshot.tuned_configs import TUNABLE_KEYS, method_config, save_best_config, train_config

EXPERIMENT = "fewshot-tune"
METRICS = ("HM50", "HM")
VAL_KEYS = ("HM", "HM50", "bAP", "bAP50", "nAP", "nAP50")
BETAS = (0.0, 0.1, 0.3, 1.0)
LR_RANGE = (1e-4, 3e-3)
MOMENTUM_RANGE = (0.5, 0.98)
# what add_classes does without a tuned config (its option defaults, read, not copied);
# a trial replaces lr and steps of ADD_CLASSES_TRAIN (warm-up: tuned_configs.warmup_for)
_ADD_DEFAULTS = AddClassesOptions(catalog_root="", mlflow_uri="", classes=[])
ADD_CLASSES_TRAIN = _ADD_DEFAULTS.train
DEFAULT_FREEZE = _ADD_DEFAULTS.freeze
DEFAULT_CONFIG = {"balancer": _ADD_DEFAULTS.balancer, "balancer_momentum": _ADD_DEFAULTS.balancer_momentum,
                  "distill_beta": _ADD_DEFAULTS.distill_beta, "lr": ADD_CLASSES_TRAIN.lr,
                  "steps": ADD_CLASSES_TRAIN.steps}


class TuneError(ValueError):
    """Bad input to a search; nothing was started."""


@dataclass
class TuneOptions:
    catalog_root: str
    mlflow_uri: str
    model_name: str = registry.DEFAULT_MODEL_NAME
    dataset: str | None = None          # default: the champion's dataset
    classes: list[str] | None = None    # default: the novel classes of class_split
    class_split: str = "split1"
    shots: int = 5
    seed: int = 0
    num_samples: int = 8
    max_concurrent: int = 1
    cpus_per_trial: int = 2
    max_steps: int = 150
    eval_every: int = 25
    grace_period: int | None = None     # default: 2 * eval_every (capped at max_steps)
    reduction_factor: float = 2.0
    val_images: int | None = 50
    batch_size: int = 8
    freeze: str = "backbone"
    teacher: str | None = "embedded"    # None: no distillation (beta fixed at 0)
    metric: str = "HM50"
    experiment: str = EXPERIMENT
    ray_address: str | None = None
    storage_path: str | None = None
    compare_seeds: int = 0
    test_images: int | None = None
    verbose: int = 1

    def check(self) -> None:
        if self.shots < 1:
            raise TuneError(f"--shots must be at least 1, got {self.shots}")
        if self.num_samples < 1:
            raise TuneError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.max_concurrent < 1 or self.cpus_per_trial < 1:
            raise TuneError("--max-concurrent and --cpus-per-trial must be at least 1")
        if self.eval_every < 1 or self.max_steps < self.eval_every:
            raise TuneError(f"need 1 <= --eval-every <= --max-steps, got {self.eval_every} and {self.max_steps}")
        if self.freeze not in POLICIES:
            raise TuneError(f"--freeze must be one of {POLICIES}, got {self.freeze!r}")
        if self.metric not in METRICS:
            raise TuneError(f"--metric must be one of {METRICS}, got {self.metric!r}")
        if self.reduction_factor <= 1:
            raise TuneError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.val_images is not None and self.val_images < 1:
            raise TuneError(f"--val-images must be at least 1, got {self.val_images}")
        if self.compare_seeds < 0:
            raise TuneError(f"--compare-seeds must be >= 0, got {self.compare_seeds}")
        if self.classes is not None:
            dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if not self.classes or dupes:
                raise TuneError(f"--classes must name distinct classes, got {self.classes}")

    @property
    def grace(self) -> int:
        g = self.grace_period if self.grace_period is not None else 2 * self.eval_every
        return max(1, min(int(g), self.max_steps))


# ---- search space ------------------------------------------------------------------------------

def step_choices(max_steps: int, eval_every: int) -> list[int]:
    """Candidate fine-tuning lengths: about 1/4, 1/2, 3/4 and all of ``max_steps``, on the
    ``eval_every`` grid (so every trial's last step is an evaluation)."""
    out = {max_steps}
    for frac in (0.25, 0.5, 0.75):
        out.add(max(eval_every, int(round(max_steps * frac / eval_every)) * eval_every))
    return sorted(s for s in out if s <= max_steps)


def search_space(max_steps: int, eval_every: int, distill: bool = True) -> dict:
    """balancer: fixed / pgb / gradnorm; its EMA momentum uniform in [0.5, 0.98) (PGB smooths
    its weights with it, gradnorm its norms; fixed ignores it); distillation beta from
    {0, 0.1, 0.3, 1} (0 only without a teacher); learning rate log-uniform in [1e-4, 3e-3]
    (add_classes' default 5e-4 inside); steps from :func:`step_choices`."""
    return {
        "balancer": tune.choice(list(BALANCERS)),
        "balancer_momentum": tune.uniform(*MOMENTUM_RANGE),
        "distill_beta": tune.choice(list(BETAS)) if distill else 0.0,
        "lr": tune.loguniform(*LR_RANGE),
        "steps": tune.choice(step_choices(max_steps, eval_every)),
    }


def describe_space(space: dict) -> dict:
    """A JSON-able description of a search space (logged as a parent-run param)."""
    out = {}
    for k, v in space.items():
        if hasattr(v, "categories"):
            out[k] = {"choice": list(v.categories)}
        elif hasattr(v, "lower") and hasattr(v, "upper"):
            kind = type(getattr(v, "sampler", None)).__name__.lower()
            out[k] = {"log" if "log" in kind else "uniform": [v.lower, v.upper]}
        else:
            out[k] = v
    return out


# ---- one trial ---------------------------------------------------------------------------------

@dataclass
class TrialPayload:
    """Everything a trial needs, built once on the driver and shipped by the object store."""

    start: DetectorCheckpoint            # the expanded parent (imprinted new rows)
    rows: list[dict]                     # K-shot novel + replay rows
    rows_with_teacher: list[dict] | None  # the same rows with ``teacher_emb`` (None: no teacher)
    teacher_dim: int | None
    val: EvalSplit
    freeze: str
    batch_size: int
    seed: int
    eval_every: int
    threads: int = 1


def val_metrics(report: EvalReport) -> dict[str, float]:
    """The validation figures a trial reports (NaN, e.g. AP of a class val lacks, as 0)."""
    return {k: (0.0 if math.isnan(v) else float(v)) for k, v in
            ((k, getattr(report, k)) for k in VAL_KEYS)}


def run_trial(config: dict, payload: TrialPayload) -> None:
    """Tune function trainable: fine-tune ``payload.start`` with ``config``; every
    ``eval_every`` steps (and at the last) score on val and ``tune.report`` the figures with
    ``step`` (the scheduler's time axis), the smoothed loss and the balancer's weights."""
    torch.set_num_threads(max(1, payload.threads))
    tcfg = train_config(config, replace(ADD_CLASSES_TRAIN, batch_size=payload.batch_size,
                                        log_every=payload.eval_every))
    method = method_config(config, payload.freeze, payload.teacher_dim)
    if method.distills and payload.rows_with_teacher is None:
        raise ValueError("this trial distils (beta > 0) but the search has no teacher")
    rows = payload.rows_with_teacher if method.distills else payload.rows

    model = payload.start.build_model()

    def report(step: int, smoothed: dict[str, float]) -> None:  # every eval_every steps and the last
        figures = val_metrics(score(to_checkpoint(model, payload.start), payload.val))
        tune.report({"step": step, **figures, "lr": smoothed["lr"],
                     **{f"train_{k}": v for k, v in smoothed.items() if k != "lr"}})

    finetune(payload.start, rows, tcfg, method, seed=payload.seed, on_log=report, model=model)


# ---- MLflow: one nested run per trial ----------------------------------------------------------

def _trial_name(index: int, config: dict) -> str:
    return (f"trial-{index:02d}-{config.get('balancer')}-b{config.get('distill_beta', 0):g}"
            f"-lr{config.get('lr', 0):.1e}-{config.get('steps')}st")


class MlflowTrialLogger(tune.Callback):
    """Driver-side: a nested MLflow run per trial (params, step-indexed val curve, outcome),
    and one progress line per report so the job log shows the search moving."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, metric: str,
                 extra_params: dict | None = None):
        self.client = registry.client(uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.metric = metric
        self.extra_params = dict(extra_params or {})
        self.runs: dict[str, str] = {}     # trial id -> MLflow run id
        self.names: dict[str, str] = {}
        self.t0 = time.time()

    def _safe(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # a logging hiccup must not kill an hour-long search
            print(f"[tune] warning: MLflow {what} failed: {err}", flush=True)
            return None

    def _print(self, text: str) -> None:
        print(f"[tune {time.time() - self.t0:7.1f}s] {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:
            return
        name = _trial_name(len(self.runs), trial.config)
        run = self._safe("create_run", self.client.create_run, self.experiment_id, run_name=name,
                         tags={"mlflow.parentRunId": self.parent_run_id, "tune.trial_id": trial.trial_id,
                               "job": "tune-trial"})
        if run is None:
            return
        self.runs[trial.trial_id] = run.info.run_id
        self.names[trial.trial_id] = name
        params = {**self.extra_params, **{k: trial.config.get(k) for k in TUNABLE_KEYS}}
        self._safe("log params", self.client.log_batch, run.info.run_id,
                   params=[Param(k, "none" if v is None else str(v)) for k, v in params.items()])
        cfg = ", ".join(f"{k}={trial.config.get(k):.3g}" if isinstance(trial.config.get(k), float)
                        else f"{k}={trial.config.get(k)}" for k in TUNABLE_KEYS)
        self._print(f"{name} started ({cfg})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        step = int(result.get("step", 0))
        if run_id is not None:
            ts = int(time.time() * 1000)
            metrics = [Metric(f"val/{k}", float(result[k]), ts, step) for k in VAL_KEYS if k in result]
            metrics += [Metric(k.replace("train_", "train/", 1), float(v), ts, step)
                        for k, v in result.items() if k.startswith("train_") and isinstance(v, (int, float))]
            if "lr" in result:
                metrics.append(Metric("lr", float(result["lr"]), ts, step))
            self._safe("log metrics", self.client.log_batch, run_id, metrics=metrics)
        self._print(f"{self.names.get(trial.trial_id, trial.trial_id)} step {step}/{trial.config.get('steps')}: "
                    f"val {self.metric}={result.get(self.metric, float('nan')):.4f} "
                    f"(bAP50={result.get('bAP50', float('nan')):.3f}, nAP50={result.get('nAP50', float('nan')):.3f}, "
                    f"loss={result.get('train_loss', float('nan')):.3f})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        last = trial.last_result or {}
        early = int(last.get("step", 0)) < int(trial.config.get("steps", 0))
        outcome = "early_stopped" if early else "completed"
        if run_id is not None:
            self._safe("set tag", self.client.set_tag, run_id, "tune.outcome", outcome)
            self._safe("end run", self.client.set_terminated, run_id, "FINISHED")
        self._print(f"{self.names.get(trial.trial_id, trial.trial_id)} {outcome.replace('_', ' ')} at step "
                    f"{last.get('step')}: val {self.metric}={last.get(self.metric, float('nan')):.4f}")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:
            self._safe("set tag", self.client.set_tag, run_id, "tune.outcome", "error")
            self._safe("end run", self.client.set_terminated, run_id, "FAILED")
        self._print(f"{self.names.get(trial.trial_id, trial.trial_id)} FAILED (see the Ray trial log)")


# ---- the search --------------------------------------------------------------------------------

@dataclass
class TrialSummary:
    trial_id: str
    run_id: str | None
    config: dict
    metrics: dict
    completed: bool
    error: str | None = None


@dataclass
class Comparison:
    seeds: list[int]
    split: str
    best: dict            # {"HM": [...], "HM50": [...], ...} per seed, plus "summary"
    default: dict


@dataclass
class TuneResult:
    parent_run_id: str
    experiment_id: str
    best_config: dict
    best_metrics: dict
    trials: list[TrialSummary] = field(default_factory=list)
    comparison: Comparison | None = None


@dataclass
class _Prepared:
    catalog: Catalog
    parent_version: registry.VersionInfo
    parent: DetectorCheckpoint
    dataset: str
    classes: list[str]
    teacher: Any


def _prepare(opts: TuneOptions, work: Path) -> _Prepared:
    """Every input check, before anything is started or logged: add_classes' own checks
    (champion, dataset, unknown or already-served classes, enough instances, the teacher),
    plus a val split to tune on."""
    classes = list(opts.classes or [])
    if not classes:
        catalog = Catalog(opts.catalog_root)
        champion = registry.get_alias(opts.mlflow_uri, opts.model_name, registry.CHAMPION)
        dataset = opts.dataset or (champion.tags.get("dataset") if champion else None)
        try:
            classes = list(catalog.manifest(dataset).class_split(opts.class_split).novel) if dataset else []
        except KeyError as err:
            raise TuneError(str(err.args[0] if err.args else err)) from None
    try:
        plan = validate(AddClassesOptions(
            catalog_root=opts.catalog_root, mlflow_uri=opts.mlflow_uri, classes=classes,
            shots=opts.shots, seed=opts.seed, dataset=opts.dataset, model_name=opts.model_name,
            teacher=opts.teacher))
    except AddClassesError as err:
        raise TuneError(str(err)) from None
    catalog = Catalog(opts.catalog_root)
    if not catalog.manifest(plan.dataset).splits.get("val"):
        raise TuneError(f"dataset {plan.dataset!r} has no val split to tune on (the test split is never used)")
    path = registry.download_checkpoint(opts.mlflow_uri, opts.model_name, plan.parent.version, work / "parent")
    return _Prepared(catalog, plan.parent, load_checkpoint(path), plan.dataset, plan.new_classes, plan.teacher)


def _payload(prep: _Prepared, opts: TuneOptions) -> TrialPayload:
    ep = sample_episode(prep.catalog, prep.parent, prep.classes, opts.shots, opts.seed, dataset=prep.dataset)
    start = expand_parent(ep)
    rows_t = TeacherEmbedder(prep.teacher)(ep.rows) if prep.teacher is not None else None
    val = load_eval_split(prep.catalog, prep.dataset, "val", list(prep.parent.classes), prep.classes,
                          max_images=opts.val_images)
    seen = {a["category_id"] for a in val.gt.get("annotations", [])}
    if not seen & set(val.base_ids) or not seen & set(val.novel_ids):
        raise TuneError(f"the first {opts.val_images} val images hold no "
                        f"{'base' if not seen & set(val.base_ids) else 'new'}-class boxes: raise --val-images")
    return TrialPayload(start=start, rows=ep.rows, rows_with_teacher=rows_t,
                        teacher_dim=prep.teacher.embed_dim if prep.teacher is not None else None,
                        val=val, freeze=opts.freeze, batch_size=opts.batch_size, seed=opts.seed,
                        eval_every=opts.eval_every, threads=opts.cpus_per_trial)


def _summaries(results, logger: MlflowTrialLogger) -> list[TrialSummary]:
    out = []
    for r in results:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or (Path(r.path).name if r.path else "?")
        config = {k: r.config.get(k) for k in TUNABLE_KEYS}
        completed = r.error is None and int(metrics.get("step", 0)) >= int(config.get("steps") or 0)
        out.append(TrialSummary(trial_id=trial_id, run_id=logger.runs.get(trial_id), config=config,
                                metrics={k: metrics[k] for k in ("step", *VAL_KEYS) if k in metrics},
                                completed=completed, error=None if r.error is None else str(r.error)))
    return out


def pick_best(trials: Sequence[TrialSummary], metric: str) -> TrialSummary:
    """The trial with the highest last ``metric`` among those that ran all their steps (a
    config is worth what it gives when trained as configured), else among all that reported."""
    pool = [t for t in trials if t.completed and metric in t.metrics] or \
           [t for t in trials if metric in t.metrics]
    if not pool:
        raise RuntimeError("no trial reported a validation score (see the trial errors above)")
    return max(pool, key=lambda t: (t.metrics[metric], t.metrics.get("HM", 0.0)))


def run_tune(opts: TuneOptions) -> TuneResult:
    """Run the search (see the module docstring); returns the best config and the trials."""
    from fewshot.ray_train import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="fewshot-tune-"))
    prep = _prepare(opts, work)
    print(f"[tune] champion {opts.model_name} v{prep.parent_version.version} ({len(prep.parent.classes)} classes); "
          f"adding {prep.classes} at {opts.shots} shots (seed {opts.seed}); tuning on val", flush=True)
    payload = _payload(prep, opts)
    print(f"[tune] support: {len(payload.rows)} images; val: {len(payload.val.rows)} images; "
          f"teacher: {opts.teacher or 'none'}", flush=True)
    space = search_space(opts.max_steps, opts.eval_every, distill=prep.teacher is not None)
    ensure_ray(opts.ray_address)

    run_name = f"tune-{'+'.join(prep.classes)}-{opts.shots}shot-s{opts.seed}"[:200]
    with tracking.start_run(opts.mlflow_uri, opts.experiment, run_name,
                            tags={"job": "tune", "parent_version": str(prep.parent_version.version),
                                  "model_name": opts.model_name}) as parent_run:
        parent_id = parent_run.info.run_id
        tracking.log_params({
            "dataset": prep.dataset, "classes": prep.classes, "shots": opts.shots, "seed": opts.seed,
            "freeze": opts.freeze, "batch_size": opts.batch_size, "metric": opts.metric, "tune_split": "val",
            "parent_version": prep.parent_version.version, "val_images": len(payload.val.rows),
            "num_samples": opts.num_samples, "max_concurrent": opts.max_concurrent,
            "cpus_per_trial": opts.cpus_per_trial, "max_steps": opts.max_steps,
            "eval_every": opts.eval_every, "grace_period": opts.grace,
            "reduction_factor": opts.reduction_factor, "teacher": opts.teacher or "none",
            "search_space": describe_space(space), "scheduler": "ASHA",
        })
        logger = MlflowTrialLogger(opts.mlflow_uri, parent_run.info.experiment_id, parent_id, opts.metric,
                                   extra_params={"freeze": opts.freeze, "shots": opts.shots, "seed": opts.seed,
                                                 "batch_size": opts.batch_size, "dataset": prep.dataset,
                                                 "classes": json.dumps(prep.classes)})
        trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload),
                                        {"cpu": opts.cpus_per_trial})
        scheduler = ASHAScheduler(time_attr="step", max_t=opts.max_steps, grace_period=opts.grace,
                                  reduction_factor=opts.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=opts.metric, mode="max", scheduler=scheduler,
                                        # seeded random search; it enforces the concurrency
                                        # limit itself (TuneConfig.max_concurrent_trials is
                                        # ignored with a BasicVariantGenerator)
                                        search_alg=BasicVariantGenerator(
                                            random_state=opts.seed, max_concurrent=opts.max_concurrent),
                                        num_samples=opts.num_samples,
                                        # a trial's actor has torch and the payload loaded: reuse it
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=f"fewshot-tune-{parent_id[:8]}", storage_path=opts.storage_path,
                                      callbacks=[logger], verbose=opts.verbose),
        )
        print(f"[tune] {opts.num_samples} trials, at most {opts.max_concurrent} at a time, "
              f"{opts.cpus_per_trial} CPU each; ASHA on val {opts.metric} (grace {opts.grace} steps, "
              f"max {opts.max_steps}); MLflow parent run {parent_id}", flush=True)
        results = tuner.fit()
        trials = _summaries(results, logger)
        mlflow.log_dict([asdict(t) for t in trials], "trials.json")
        failed = [t for t in trials if t.error]
        if failed:
            print(f"[tune] {len(failed)} trial(s) failed: {failed[0].error[:500]}", flush=True)
        best = pick_best(trials, opts.metric)
        best_metrics = {k: v for k, v in best.metrics.items() if k in VAL_KEYS}
        mlflow.log_params({f"best.{k}": "none" if v is None else v for k, v in best.config.items()})
        mlflow.log_metrics({f"best_val_{k}": v for k, v in best_metrics.items()})
        mlflow.set_tags({"best_trial_run": best.run_id or "", "trials_completed":
                         str(sum(t.completed for t in trials)), "trials_total": str(len(trials))})
        save_best_config(opts.mlflow_uri, opts.model_name, best.config, parent_id, best_metrics)
        print(f"[tune] best: {best.config} -> val {opts.metric}={best.metrics[opts.metric]:.4f}, "
              f"HM={best.metrics.get('HM', float('nan')):.4f}; stored as the best config of "
              f"{opts.model_name} (run {parent_id})", flush=True)
        result = TuneResult(parent_run_id=parent_id, experiment_id=parent_run.info.experiment_id,
                            best_config=best.config, best_metrics=best_metrics, trials=trials)
        if opts.compare_seeds:
            result.comparison = compare_configs(prep, opts, best.config)
            log_comparison(result.comparison)
    return result


# ---- best vs default on the test split ---------------------------------------------------------

def _mean_ci(values) -> dict[str, float]:
    ci = mean_ci95(values)
    return {"mean": ci.mean, "ci95": ci.half_width}


def _episode_remote(episode, cfg: TrainConfig, method: MethodConfig, split: EvalSplit, threads: int) -> dict:
    """One seed of a comparison: expand, fine-tune, score on ``split`` (rows pre-embedded)."""
    torch.set_num_threads(max(1, threads))
    start = expand_parent(episode)
    model = finetune(start, episode.rows, cfg, method, seed=episode.seed)
    return val_metrics(score(to_checkpoint(model, start), split))


def compare_configs(prep: _Prepared, opts: TuneOptions, best_config: dict,
                    default_config: dict | None = None) -> Comparison:
    """Fine-tune with ``best_config`` (and ``opts.freeze``) and with ``default_config`` (default:
    add_classes' defaults, freeze=head, no balancer, beta 0, lr 5e-4, 150 steps) on
    ``opts.compare_seeds`` fresh support draws (seeds ``seed+1``..), each scored on the test
    split (val if the dataset has none); one Ray task per fine-tune."""
    seeds = [opts.seed + 1 + i for i in range(opts.compare_seeds)]
    manifest = prep.catalog.manifest(prep.dataset)
    split = "test" if manifest.splits.get("test") else "val"
    test = load_eval_split(prep.catalog, prep.dataset, split, list(prep.parent.classes), prep.classes,
                           max_images=opts.test_images)
    test_ref = ray.put(test)
    base = replace(ADD_CLASSES_TRAIN, batch_size=opts.batch_size)
    teacher_dim = prep.teacher.embed_dim if prep.teacher is not None else None
    setups = {
        "best": (train_config(best_config, base), method_config(best_config, opts.freeze, teacher_dim)),
        "default": (train_config(default_config or DEFAULT_CONFIG, base),
                    method_config(default_config or DEFAULT_CONFIG, DEFAULT_FREEZE)),
    }
    embedder = TeacherEmbedder(prep.teacher) if prep.teacher is not None else None
    task = ray.remote(num_cpus=opts.cpus_per_trial)(_episode_remote)
    pending = {}
    for seed in seeds:
        ep = sample_episode(prep.catalog, prep.parent, prep.classes, opts.shots, seed, dataset=prep.dataset)
        for name, (cfg, method) in setups.items():
            this = ep
            if method.distills:
                this = replace(ep, novel_rows=embedder(ep.novel_rows), replay_rows=embedder(ep.replay_rows))
            ref = task.remote(this, cfg, method, test_ref, opts.cpus_per_trial)
            pending[ref] = (name, seed)
    print(f"[tune] comparing best vs default on {split} ({len(test.rows)} images), seeds {seeds}: "
          f"{len(pending)} fine-tunes", flush=True)
    per: dict[str, dict[int, dict]] = {"best": {}, "default": {}}
    waiting = list(pending)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        name, seed = pending[ready[0]]
        per[name][seed] = ray.get(ready[0])
        print(f"[tune] {name} seed {seed}: {split} HM={per[name][seed]['HM']:.4f} "
              f"HM50={per[name][seed]['HM50']:.4f} ({len(pending) - len(waiting)}/{len(pending)})", flush=True)

    def table(name):
        rows = [per[name][s] for s in seeds]
        out = {k: [r[k] for r in rows] for k in VAL_KEYS}
        out["summary"] = {k: _mean_ci(out[k]) for k in VAL_KEYS}
        return out

    comp = Comparison(seeds=seeds, split=split, best=table("best"), default=table("default"))
    for name in ("best", "default"):
        s = getattr(comp, name)["summary"]
        print(f"[tune] {name:7s}: {split} HM = {s['HM']['mean']:.4f} ± {s['HM']['ci95']:.4f}, "
              f"HM50 = {s['HM50']['mean']:.4f} ± {s['HM50']['ci95']:.4f} (mean ± 95% CI, n={len(seeds)})",
              flush=True)
    return comp


def log_comparison(comp: Comparison) -> None:
    """Comparison figures into the active (parent) run."""
    metrics = {}
    for name in ("best", "default"):
        for k, v in getattr(comp, name)["summary"].items():
            metrics[f"compare_{name}_{comp.split}_{k}_mean"] = v["mean"]
            if not math.isnan(v["ci95"]):
                metrics[f"compare_{name}_{comp.split}_{k}_ci95"] = v["ci95"]
    mlflow.log_metrics(metrics)
    mlflow.log_dict(asdict(comp), "comparison.json")
