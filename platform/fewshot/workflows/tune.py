"""Ray Tune over add_classes fine-tuning (balancer, its smoothing, distillation beta,
learning rate, steps and, where add_classes applies it, the parent distillation weight), with
one MLflow parent run and one nested run per trial.

What one search does (``jobs/tune.py`` is the command line):

1. On the driver: resolve ``models:/NAME@champion``, draw the K-shot support sets of the new
   classes (:func:`fewshot.learning.episode.sample_episode`, seed ``seed``), imprint the new classifier
   rows (:func:`fewshot.learning.episode.expand_parent`), add the parent's old-class pseudo-labels
   to a copy of the support rows (``pseudo_labels``, for the trials whose freeze policy trains
   more than the new rows, as add_classes does; :mod:`fewshot.learning.pseudo_labels`), embed the
   support boxes with the CLIP teacher once (for the trials that distil), and load the first ``val_images`` images of the **val**
   split (the test split is never looked at while searching). All of it travels to the trials
   through the object store (``tune.with_parameters``), so trials need no shared disk.
2. Every trial (:func:`fewshot.backends.ray_tune.run_trial`, one Ray actor holding ``cpus_per_trial`` CPUs) fine-tunes
   that same expanded start with its sampled hyperparameters through
   :func:`fewshot.learning.method.finetune`, whose logging callback scores the current weights on val
   every ``eval_every`` steps and calls ``ray.tune.report``. Configurations are drawn by Tune's
   random search seeded with ``seed`` (a rerun tries the same ones); the ASHA scheduler stops
   the trials whose validation figure trails at a rung. With ``draws`` > 1 the driver draws
   that many support sets (seeds ``seed + 1000 i``) and every trial fine-tunes on each; its
   reported figure is the mean over the draws (one draw rewards whatever happens to fit it).
   With ``include_default`` the first trial is add_classes' own defaults under their own
   freezing policy (:func:`default_trial`, Ray Tune's ``points_to_evaluate``), so the search
   keeps them unless a sampled configuration scores higher on val.
3. A driver-side Tune callback (:class:`fewshot.backends.ray_tune.MlflowTrialLogger`) opens a nested MLflow run per trial
   (tag ``mlflow.parentRunId``), logs its hyperparameters as params and its validation curve as
   step-indexed metrics (``val/HM50``, ``val/HM``, ``val/bAP`` ...), so trials line up side by
   side in the MLflow UI; trials ASHA stopped are tagged ``tune.outcome=early_stopped``.
4. The best trial among those that ran all their steps (by the last reported validation
   figure) is logged to the parent run and stored with
   :func:`fewshot.backends.tuned_configs.save_best_config` (artifact ``best_config.json`` plus the
   registered-model tag ``fewshot.best_config_run``) for ``add_classes --config best``.
5. Optionally (:func:`compare_configs`) the best and the default add_classes configuration are
   each fine-tuned on ``N`` fresh support draws and scored on the **test** split; mean HM with a
   95% t-interval goes to the parent run. When the best configuration is the defaults themselves the
   comparison is skipped (it would train the same configuration twice on the same draws).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Literal

from catalog import Catalog
from fewshot.backends import registry, tracking
from fewshot.backends.cluster import ClusterOptions, ensure_ray
from fewshot.backends.ray_train import storage_for
from fewshot.backends.ray_tune import (
    VAL_KEYS, MlflowTrialLogger, TrialDraw, TrialPayload, TrialSummary, describe_space, pick_best,
    run_finetunes, run_search, search_space,
)
from fewshot.backends.tuned_configs import apply_to, save_best_config
from fewshot.learning.episode import expand_parent, pseudo_label_episode, sample_episode
from fewshot.learning.method import FreezePolicy, MethodOptions, TeacherEmbedder
from fewshot.metrics.coco_eval import load_eval_split
from fewshot.metrics.stats import mean_ci95
from fewshot.model.checkpoint import DetectorCheckpoint
from fewshot.model.cosine_head import DEFAULT_SCORING, Scoring
from fewshot.workflows.add_classes import AddClassesError, AddClassesOptions, validate
from fewshot.workflows.options import Flat, NameList, StoreOptions

DRAW_SEED_STRIDE = 1000  # trial draws: seed + 1000 i; the comparison's fresh draws: seed + 1 .. seed + N

# What add_classes does without a tuned configuration: its own option defaults, read, not copied.
ADD_CLASSES_DEFAULTS = AddClassesOptions()


class TuneError(ValueError):
    """Bad input to a search; nothing was started."""


@dataclass(frozen=True)
class TuneOptions:
    """Ray Tune over add_classes fine-tuning: balancer (fixed / pgb / gradnorm) and its smoothing
    momentum, CLIP distillation weight beta (0 included), learning rate (log-uniform) and number of
    steps, scheduled by ASHA on the validation harmonic mean of bAP and nAP (the test split is
    never used while searching). One MLflow parent run, one nested run per trial; the best
    configuration is stored on the registered model for `jobs/add_classes.py --tuned-config best`."""

    classes: NameList = ()
    """Comma-separated classes to add in every trial (default: the novel classes of --class-split)."""
    class_split: str = "split1"
    """Class split of the dataset whose novel classes are added when --classes is not given."""
    dataset: str | None = None
    """Dataset (default: the champion's)."""
    shots: int = 5
    """K: annotated instances per new class."""
    seed: int = 0
    """Seed of the first K-shot support draw, of training and of the random search; all trials
    share the draws so they differ only in their hyperparameters."""
    draws: int = 3
    """Support draws every trial fine-tunes on (seeds --seed, --seed+1000, ...); a trial scores
    the mean of its val figures over them, so the search rewards a configuration that works on
    several support sets rather than one that fits a single draw."""
    freeze: FreezePolicy = "backbone"
    """What trains in every sampled trial. backbone: box head, classifier and regressor train
    (backbone and RPN frozen). With add_classes' own default 'head' only the new classifier rows
    train, so the balancer and distillation (both act on the shared RoI feature) would change
    nothing."""
    pseudo_labels: float | None = 0.9
    """As add_classes --pseudo-labels: the parent's detections of its own classes with at least
    this score are added to each draw's support images, for the trials (and comparison
    fine-tunes) whose freeze policy trains more than the new classifier rows; None: off. Use
    the value add_classes will run with, so the trials train as it will."""
    scoring: Scoring = DEFAULT_SCORING
    """How every trial's child scores its classes on val (per-increment: each class against the
    classes that existed when it was added; joint, the default: one softmax, the scoring the
    training loss uses). add_classes' default, auto, chooses between the two per version on val
    after fine-tuning; trials compare training configurations, so they score one way."""
    include_default: bool = True
    """Run add_classes' own defaults (its freeze policy, no balancer, its lr and steps, steps
    capped at --max-steps) as the first trial, on the same draws: the search keeps them unless a
    sampled configuration scores higher on val. It counts in --num-samples."""
    batch_size: int = 8
    """Images per fine-tuning step."""
    teacher: str | None = "embedded"
    """CLIP teacher for the trials with distillation beta > 0 ('embedded', 'embedded:PATH',
    'MODEL:TAG', 'MODEL@FILE'); 'none' tunes without distillation (beta fixed at 0)."""
    num_samples: int = 8
    """Configurations (trials) to try."""
    max_concurrent: int = 1
    """Trials running at the same time (each also needs --cpus-per-worker free CPUs, and
    --gpus-per-worker GPUs with --gpu)."""
    max_steps: int = 150
    """Longest fine-tune; the steps dimension samples ~1/4, 1/2, 3/4 and all of it (multiples of
    --eval-every). ASHA's max_t."""
    eval_every: int = 25
    """Score on the val split and report to Tune every this many steps (ASHA's rungs and the
    MLflow val curves are at these steps)."""
    grace_period: int | None = None
    """ASHA: steps every trial runs before it can be stopped (default: 2 x --eval-every)."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/this of trials at each rung."""
    metric: Literal["HM50", "HM"] = "HM50"
    """Validation figure ASHA maximizes and the best trial is chosen by: HM50 = harmonic mean of
    bAP50 and nAP50; HM = harmonic mean of bAP and nAP (COCO AP@[.5:.95]). Both are logged."""
    val_images: int | None = 50
    """Score trials on the first this many images of the val split."""
    compare_seeds: int = 0
    """N > 0: fine-tune with the best config and with add_classes' defaults on N fresh support
    draws (seeds --seed+1 .. --seed+N), score both on the TEST split (reported, never used to
    choose), print mean HM/HM50 with a 95% t-interval and log them to the parent run."""
    test_images: int | None = None
    """Score the comparison on at most this many test images (default: all)."""
    quiet: bool = False
    """No Ray Tune status table; only this job's one line per trial report."""
    config_file: str | None = None
    """A YAML file of these options (flag names, flat or grouped); flags given beside it win."""
    store: Annotated[StoreOptions, Flat] = field(default_factory=lambda: StoreOptions(experiment="fewshot-tune"))
    cluster: Annotated[ClusterOptions, Flat] = field(
        default_factory=lambda: ClusterOptions(num_workers=1, cpus_per_worker=2))

    def check(self) -> None:
        try:
            self.store.check()
            self.cluster.check()
        except ValueError as err:
            raise TuneError(str(err)) from None
        if self.cluster.num_workers != 1:
            raise TuneError("a trial is one process: --num-workers must be 1 (use --max-concurrent "
                            "for trials side by side, --cpus-per-worker for CPUs per trial)")
        if self.shots < 1:
            raise TuneError(f"--shots must be at least 1, got {self.shots}")
        if self.num_samples < 1:
            raise TuneError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.max_concurrent < 1 or self.batch_size < 1:
            raise TuneError("--max-concurrent and --batch-size must be at least 1")
        if self.eval_every < 1 or self.max_steps < self.eval_every:
            raise TuneError(f"need 1 <= --eval-every <= --max-steps, got {self.eval_every} and {self.max_steps}")
        if self.reduction_factor <= 1:
            raise TuneError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.val_images is not None and self.val_images < 1:
            raise TuneError(f"--val-images must be at least 1, got {self.val_images}")
        if not 1 <= self.draws <= 100:
            raise TuneError(f"--draws must be within 1..100, got {self.draws}")
        if not 0 <= self.compare_seeds < DRAW_SEED_STRIDE:
            raise TuneError(f"--compare-seeds must be within 0..{DRAW_SEED_STRIDE - 1} (its fresh draws must "
                            f"not reach the trials' seeds), got {self.compare_seeds}")
        dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dupes:
            raise TuneError(f"--classes must name distinct classes, got {list(self.classes)}")

    @property
    def teacher_spec(self) -> str | None:
        return None if self.teacher is None or self.teacher.lower() == "none" else self.teacher

    @property
    def grace(self) -> int:
        g = self.grace_period if self.grace_period is not None else 2 * self.eval_every
        return max(1, min(int(g), self.max_steps))

    @property
    def trial_method(self) -> MethodOptions:
        """What a trial starts from (the tuned keys replace balancer, momentum and beta)."""
        return MethodOptions(freeze=self.freeze, teacher=self.teacher_spec)

    @property
    def trial_train(self):
        """add_classes' schedule at this batch size (the tuned keys replace lr and steps)."""
        return replace(ADD_CLASSES_DEFAULTS.train, batch_size=self.batch_size)


def default_config() -> dict:
    """add_classes' defaults as a tuned config (what ``--compare-seeds`` compares against)."""
    m, t = ADD_CLASSES_DEFAULTS.method, ADD_CLASSES_DEFAULTS.train
    return {"balancer": m.balancer, "balancer_momentum": m.balancer_momentum,
            "distill_beta": m.distill_beta, "lr": t.lr, "steps": t.steps, "parent_distill": m.parent_distill}


def default_trial(max_steps: int) -> dict:
    """add_classes' defaults as a whole trial configuration, with their freezing policy (the
    point a search evaluates first with ``--include-default``); steps capped at ``max_steps``."""
    cfg = default_config()
    return {**cfg, "freeze": ADD_CLASSES_DEFAULTS.method.freeze, "steps": min(int(cfg["steps"]), int(max_steps))}


def _is_default(config: dict) -> bool:
    """Whether ``config`` trains as add_classes does with no tuned config (its policy, its steps)."""
    want = {**default_config(), "freeze": ADD_CLASSES_DEFAULTS.method.freeze}
    # a config without a parent distillation weight trains with add_classes' (tuned_configs)
    config = {"parent_distill": ADD_CLASSES_DEFAULTS.method.parent_distill, **config}
    return all(config.get(k) == v for k, v in want.items())


@dataclass
class Comparison:
    seeds: list[int]
    split: str
    best: dict            # {"HM": [...], "HM50": [...], ...} per seed, plus "summary"
    default: dict
    paired: dict = field(default_factory=dict)  # best - default on the same draw: {"HM": {"mean", "ci95"}, ...}


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


def _prepare(opts: TuneOptions) -> _Prepared:
    """Every input check, before anything is started or logged: add_classes' own checks
    (champion, dataset, unknown or already-served classes, enough instances, a val split, the
    teacher)."""
    opts.check()
    classes = list(opts.classes)
    store = opts.store
    if not classes:
        catalog = Catalog(store.catalog)
        champion = registry.get_alias(store.mlflow_uri, store.model_name, registry.CHAMPION)
        dataset = opts.dataset or (champion.tags.get("dataset") if champion else None)
        try:
            classes = list(catalog.manifest(dataset).class_split(opts.class_split).novel) if dataset else []
        except KeyError as err:
            raise TuneError(str(err.args[0] if err.args else err)) from None
    try:
        plan = validate(AddClassesOptions(classes=tuple(classes), shots=opts.shots, seed=opts.seed,
                                          dataset=opts.dataset, store=store,
                                          method=MethodOptions(teacher=opts.teacher_spec),
                                          max_val_images=1, max_test_images=1))
    except AddClassesError as err:
        raise TuneError(str(err)) from None
    shutil.rmtree(plan.work, ignore_errors=True)
    return _Prepared(Catalog(store.catalog), plan.parent, plan.parent_ckpt, plan.dataset, plan.new_classes,
                     plan.teacher)


def _payload(prep: _Prepared, opts: TuneOptions) -> TrialPayload:
    draws = []
    for i in range(opts.draws):
        seed = opts.seed + DRAW_SEED_STRIDE * i
        ep = sample_episode(prep.catalog, prep.parent, prep.classes, opts.shots, seed, dataset=prep.dataset)
        embed = TeacherEmbedder(prep.teacher) if prep.teacher is not None else None
        start = expand_parent(ep, device=opts.cluster.device(), scoring=opts.scoring)
        pseudo = pseudo_t = None
        if opts.pseudo_labels is not None:
            labelled, stats = pseudo_label_episode(ep, opts.pseudo_labels, device=opts.cluster.device())
            pseudo = labelled.rows
            pseudo_t = embed(pseudo) if embed is not None else None
            print(f"[tune] draw {seed}: the parent labelled {stats.added} objects of its own classes "
                  f"(score >= {opts.pseudo_labels:g}) for the trials that train the box head or the RPN", flush=True)
        draws.append(TrialDraw(start=start, rows=ep.rows, rows_with_teacher=embed(ep.rows) if embed else None,
                               seed=seed, pseudo_rows=pseudo, pseudo_rows_with_teacher=pseudo_t))
    val = load_eval_split(prep.catalog, prep.dataset, "val", list(prep.parent.classes), prep.classes,
                          max_images=opts.val_images)
    seen = {a["category_id"] for a in val.gt.get("annotations", [])}
    if not seen & set(val.base_ids) or not seen & set(val.novel_ids):
        raise TuneError(f"the first {opts.val_images} val images hold no "
                        f"{'base' if not seen & set(val.base_ids) else 'new'}-class boxes: raise --val-images")
    return TrialPayload(draws=draws,
                        teacher_dim=prep.teacher.embed_dim if prep.teacher is not None else None,
                        val=val, method=opts.trial_method, train=opts.trial_train,
                        eval_every=opts.eval_every, threads=opts.cluster.cpus_per_worker,
                        gpus=opts.cluster.gpus, precision=opts.cluster.precision)


def run_tune(opts: TuneOptions) -> TuneResult:
    """Run the search (see the module docstring); returns the best config and the trials."""
    prep = _prepare(opts)
    store = opts.store
    print(f"[tune] champion {store.model_name} v{prep.parent_version.version} ({len(prep.parent.classes)} classes); "
          f"adding {prep.classes} at {opts.shots} shots (seed {opts.seed}); tuning on val", flush=True)
    payload = _payload(prep, opts)
    print(f"[tune] {len(payload.draws)} support draws of {len(payload.draws[0].rows)} images each "
          f"(seeds {', '.join(str(d.seed) for d in payload.draws)}); val: {len(payload.val.rows)} images; "
          f"teacher: {opts.teacher_spec or 'none'}", flush=True)
    space = search_space(opts.max_steps, opts.eval_every, distill=prep.teacher is not None, freeze=opts.freeze)
    points = [default_trial(opts.max_steps)] if opts.include_default else []
    if points:
        capped = "" if points[0]["steps"] == default_config()["steps"] else f", steps capped at {opts.max_steps}"
        print(f"[tune] trial 0 is add_classes' defaults (freeze {points[0]['freeze']}, lr {points[0]['lr']:g}, "
              f"{points[0]['steps']} steps{capped}); the other {opts.num_samples - 1} are sampled", flush=True)
    ensure_ray(opts.cluster.ray_address)
    cpus = opts.cluster.cpus_per_worker
    storage_path, storage_fs = storage_for(opts.cluster)

    run_name = f"tune-{'+'.join(prep.classes)}-{opts.shots}shot-s{opts.seed}"[:200]
    with tracking.start_run(store.mlflow_uri, store.experiment, run_name,
                            tags={"job": "tune", "parent_version": str(prep.parent_version.version),
                                  "model_name": store.model_name}) as parent_run:
        parent_id = parent_run.info.run_id
        tracking.log_params({
            "dataset": prep.dataset, "classes": prep.classes, "shots": opts.shots, "seed": opts.seed,
            "draws": opts.draws,
            "freeze": opts.freeze, "pseudo_labels": "off" if opts.pseudo_labels is None else opts.pseudo_labels,
            "batch_size": opts.batch_size, "metric": opts.metric, "tune_split": "val",
            "parent_version": prep.parent_version.version, "val_images": len(payload.val.rows),
            "num_samples": opts.num_samples, "max_concurrent": opts.max_concurrent,
            "cpus_per_trial": cpus, "gpus_per_trial": opts.cluster.gpus, "precision": opts.cluster.precision,
            "max_steps": opts.max_steps,
            "eval_every": opts.eval_every, "grace_period": opts.grace,
            "reduction_factor": opts.reduction_factor, "teacher": opts.teacher_spec or "none",
            "search_space": describe_space(space), "scheduler": "ASHA",
            "default_trial": json.dumps(points[0]) if points else "none",
        })
        logger = MlflowTrialLogger(store.mlflow_uri, parent_run.info.experiment_id, parent_id, opts.metric,
                                   extra_params={"freeze": opts.freeze, "shots": opts.shots, "seed": opts.seed,
                                                 "batch_size": opts.batch_size, "dataset": prep.dataset,
                                                 "classes": json.dumps(prep.classes)})
        print(f"[tune] {opts.num_samples} trials, at most {opts.max_concurrent} at a time, "
              f"{cpus} CPU each; ASHA on val {opts.metric} (grace {opts.grace} steps, "
              f"max {opts.max_steps}); MLflow parent run {parent_id}", flush=True)
        trials = run_search(payload, space, logger, metric=opts.metric, num_samples=opts.num_samples,
                            max_concurrent=opts.max_concurrent, cpus_per_trial=cpus,
                            max_steps=opts.max_steps, grace=opts.grace, gpus_per_trial=opts.cluster.gpus,
                            reduction_factor=opts.reduction_factor, seed=opts.seed,
                            name=f"fewshot-tune-{parent_id[:8]}", storage_path=storage_path,
                            storage_filesystem=storage_fs,
                            verbose=0 if opts.quiet else 1, points=points)
        tracking.log_dict([asdict(t) for t in trials], "trials.json")
        failed = [t for t in trials if t.error]
        if failed:
            print(f"[tune] {len(failed)} trial(s) failed: {failed[0].error[:500]}", flush=True)
        best = pick_best(trials, opts.metric)
        best_metrics = {k: v for k, v in best.metrics.items() if k in VAL_KEYS}
        tracking.log_params({f"best.{k}": "none" if v is None else v for k, v in best.config.items()})
        tracking.log_metrics({f"best_val_{k}": v for k, v in best_metrics.items()})
        tracking.set_tags({"best_trial_run": best.run_id or "", "trials_completed":
                           str(sum(t.completed for t in trials)), "trials_total": str(len(trials))})
        save_best_config(store.mlflow_uri, store.model_name, best.config, parent_id, best_metrics)
        if points and best.config == points[0]:
            print("[tune] no sampled configuration scored higher on val than add_classes' defaults: "
                  "they are the best configuration", flush=True)
        print(f"[tune] best: {best.config} -> val {opts.metric}={best.metrics[opts.metric]:.4f}, "
              f"HM={best.metrics.get('HM', float('nan')):.4f}; stored as the best config of "
              f"{store.model_name} (run {parent_id})", flush=True)
        result = TuneResult(parent_run_id=parent_id, experiment_id=parent_run.info.experiment_id,
                            best_config=best.config, best_metrics=best_metrics, trials=trials)
        if opts.compare_seeds and _is_default(best.config):
            # the comparison would fine-tune the same configuration twice on the same draws
            print("[tune] --compare-seeds: the best configuration is add_classes' defaults; no "
                  "comparison to run (best - default is 0 by construction)", flush=True)
            tracking.set_tags({"compare": "skipped: best is the default"})
        elif opts.compare_seeds:
            result.comparison = compare_configs(prep, opts, best.config)
            log_comparison(result.comparison)
    return result


# ---- best vs default on fresh draws, reported on the test split ---------------------------------

def _mean_ci(values) -> dict[str, float]:
    ci = mean_ci95(values)
    return {"mean": ci.mean, "ci95": ci.half_width}


def compare_configs(prep: _Prepared, opts: TuneOptions, best_config: dict,
                    default: dict | None = None) -> Comparison:
    """Fine-tune with ``best_config`` (under its own ``freeze``, else ``opts.freeze``) and with ``default`` (default:
    add_classes' own defaults, :func:`default_config`, under its freeze policy) on
    ``opts.compare_seeds`` fresh support draws (seeds ``seed+1``..), each scored on the test
    split (val if the dataset has none); one Ray task per fine-tune."""
    seeds = [opts.seed + 1 + i for i in range(opts.compare_seeds)]
    manifest = prep.catalog.manifest(prep.dataset)
    split = "test" if manifest.splits.get("test") else "val"
    test = load_eval_split(prep.catalog, prep.dataset, split, list(prep.parent.classes), prep.classes,
                           max_images=opts.test_images)
    teacher_dim = prep.teacher.embed_dim if prep.teacher is not None else None
    setups = {}
    for name, cfg, method in (("best", best_config, opts.trial_method),
                              ("default", default or default_config(), ADD_CLASSES_DEFAULTS.method)):
        m, t = apply_to(cfg, method, opts.trial_train)
        setups[name] = (t, m.config(teacher_dim))
    embedder = TeacherEmbedder(prep.teacher) if prep.teacher is not None else None
    jobs = {}
    for seed in seeds:
        ep = sample_episode(prep.catalog, prep.parent, prep.classes, opts.shots, seed, dataset=prep.dataset)
        labelled = None
        for name, (cfg, method) in setups.items():
            rows = ep.rows
            if opts.pseudo_labels is not None and method.freeze != "head":  # as add_classes trains it
                if labelled is None:
                    labelled = pseudo_label_episode(ep, opts.pseudo_labels, device=opts.cluster.device())[0]
                rows = labelled.rows
            if method.distills:
                rows = embedder(rows)
            jobs[(name, seed)] = (ep, cfg, method, rows)
    print(f"[tune] comparing best vs default on {split} ({len(test.rows)} images), seeds {seeds}: "
          f"{len(jobs)} fine-tunes", flush=True)

    def done(key, figures, n, total):
        print(f"[tune] {key[0]} seed {key[1]}: {split} HM={figures['HM']:.4f} HM50={figures['HM50']:.4f} "
              f"({n}/{total})", flush=True)

    per = run_finetunes(jobs, test, opts.cluster.cpus_per_worker, on_done=done, gpus=opts.cluster.gpus,
                        precision=opts.cluster.precision, scoring=opts.scoring)

    def table(name):
        rows = [per[(name, s)] for s in seeds]
        out = {k: [r[k] for r in rows] for k in VAL_KEYS}
        out["summary"] = {k: _mean_ci(out[k]) for k in VAL_KEYS}
        return out

    best, base = table("best"), table("default")
    paired = {k: _mean_ci([b - d for b, d in zip(best[k], base[k])]) for k in VAL_KEYS}
    comp = Comparison(seeds=seeds, split=split, best=best, default=base, paired=paired)
    for name in ("best", "default"):
        s = getattr(comp, name)["summary"]
        print(f"[tune] {name:7s}: {split} HM = {s['HM']['mean']:.4f} ± {s['HM']['ci95']:.4f}, "
              f"HM50 = {s['HM50']['mean']:.4f} ± {s['HM50']['ci95']:.4f} (mean ± 95% CI, n={len(seeds)})",
              flush=True)
    print(f"[tune] best - default, paired over the same draws: HM {paired['HM']['mean']:+.4f} ± "
          f"{paired['HM']['ci95']:.4f}, HM50 {paired['HM50']['mean']:+.4f} ± {paired['HM50']['ci95']:.4f}",
          flush=True)
    return comp


def log_comparison(comp: Comparison) -> None:
    """Comparison figures into the active (parent) run."""
    metrics = {}
    for name in ("best", "default"):
        for k, v in getattr(comp, name)["summary"].items():
            metrics[f"compare_{name}_{comp.split}_{k}_mean"] = v["mean"]
            metrics[f"compare_{name}_{comp.split}_{k}_ci95"] = v["ci95"]
    for k, v in comp.paired.items():
        metrics[f"compare_paired_{comp.split}_{k}_mean"] = v["mean"]
        metrics[f"compare_paired_{comp.split}_{k}_ci95"] = v["ci95"]
    tracking.log_metrics(metrics)
    tracking.log_dict(asdict(comp), "comparison.json")
