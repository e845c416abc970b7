"""Glue: the Ray Tune side of a search over add_classes fine-tuning: the search space, one
trial (a Tune function trainable that fine-tunes and reports val figures), the driver-side
callback that gives each trial a nested MLflow run, running the Tuner, and running a set of
fine-tunes as Ray tasks. What a search is for, and its checks, live in
:mod:`fewshot.workflows.tune`.

The scheduler's metric is ``HM50`` by default (``metric="HM"`` is available): on a small val
set, a few-shot fine-tune's novel AP at the strict IoU thresholds of AP@[.5:.95] is often
exactly zero for many steps, so HM is zero for many trials at once and ASHA's rung comparisons
become ties; AP50 already moves after a few steps and still ranks "learned the new classes
without forgetting the old" by the harmonic mean. Both are reported and logged every time.
"""
from __future__ import annotations

import atexit

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import ray
import torch
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from fewshot.backends import registry
from fewshot.backends.tuned_configs import CONFIG_KEYS, apply_to
from fewshot.balancers import balancer_names
from fewshot.learning.episode import expand_parent, score, to_checkpoint
from fewshot.learning.parent_distillation import PARENT_DISTILL_POLICIES
from fewshot.model.trunk_cache import TrunkCache, trunk_fingerprint, use_trunk_cache
from fewshot.learning.loop import TrainConfig
from fewshot.learning.method import MethodOptions, finetune
from fewshot.metrics.coco_eval import EvalReport, EvalSplit
from fewshot.model.checkpoint import DetectorCheckpoint
from fewshot.model.devices import resolve_device, resolve_precision

METRICS = ("HM50", "HM")
VAL_KEYS = ("HM", "HM50", "bAP", "bAP50", "nAP", "nAP50")
BETAS = (0.0, 0.1, 0.3, 1.0)
# lambda of the parent distillation (add_classes' default 1 inside; at add_classes' schedule the
# val criterion of README *The learning methods* ranked 3 and 10 above 1, so the grid goes past it)
PARENT_DISTILL_WEIGHTS = (0.0, 1.0, 3.0, 10.0)
LR_RANGE = (1e-4, 3e-3)
MOMENTUM_RANGE = (0.5, 0.98)
# ---- search space ------------------------------------------------------------------------------

def step_choices(max_steps: int, eval_every: int) -> list[int]:
    """Candidate fine-tuning lengths: about 1/4, 1/2, 3/4 and all of ``max_steps``, on the
    ``eval_every`` grid (so every trial's last step is an evaluation)."""
    out = {max_steps}
    for frac in (0.25, 0.5, 0.75):
        out.add(max(eval_every, int(round(max_steps * frac / eval_every)) * eval_every))
    return sorted(s for s in out if s <= max_steps)


def search_space(max_steps: int, eval_every: int, distill: bool = True, freeze: str = "backbone") -> dict:
    """balancer: fixed / pgb / gradnorm; its EMA momentum uniform in [0.5, 0.98) (PGB smooths
    its weights with it, gradnorm its norms; fixed ignores it); distillation beta from
    {0, 0.1, 0.3, 1} (0 only without a teacher); learning rate log-uniform in [1e-4, 3e-3]
    (add_classes' default 5e-4 inside); steps from :func:`step_choices`; ``freeze`` fixed (the
    sampled trials' policy; a point evaluated first, such as add_classes' defaults, may name
    another); where add_classes applies parent distillation (``freeze`` backbone or rpn-head,
    :data:`~fewshot.learning.parent_distillation.PARENT_DISTILL_POLICIES`) its weight lambda
    from :data:`PARENT_DISTILL_WEIGHTS` (elsewhere it is skipped, so it is not searched)."""
    parent = ({"parent_distill": tune.choice(list(PARENT_DISTILL_WEIGHTS))}
              if freeze in PARENT_DISTILL_POLICIES else {})
    return {
        "freeze": freeze,
        "balancer": tune.choice(list(balancer_names())),
        "balancer_momentum": tune.uniform(*MOMENTUM_RANGE),
        "distill_beta": tune.choice(list(BETAS)) if distill else 0.0,
        "lr": tune.loguniform(*LR_RANGE),
        "steps": tune.choice(step_choices(max_steps, eval_every)),
        **parent,
    }


def describe_space(space: dict) -> dict:
    """A JSON-able description of a search space (logged as a parent-run param)."""
    out = {}
    for k, v in space.items():
        if isinstance(v, (str, int, float, bool)) or v is None:  # a constant (str has .lower too)
            out[k] = v
        elif hasattr(v, "categories"):
            out[k] = {"choice": list(v.categories)}
        elif hasattr(v, "lower") and hasattr(v, "upper"):
            kind = type(getattr(v, "sampler", None)).__name__.lower()
            out[k] = {"log" if "log" in kind else "uniform": [v.lower, v.upper]}
        else:
            out[k] = v
    return out


# ---- one trial ---------------------------------------------------------------------------------

@dataclass
class TrialDraw:
    """One K-shot support draw: the expanded parent it imprints and the rows it trains on."""

    start: DetectorCheckpoint            # the expanded parent (new rows imprinted from this draw)
    rows: list[dict]                     # K-shot novel + replay rows
    rows_with_teacher: list[dict] | None  # the same rows with ``teacher_emb`` (None: no teacher)
    seed: int                            # the draw's seed, also the fine-tune's
    # the same rows with the parent's old-class pseudo-labels (fewshot.learning.pseudo_labels),
    # for the trials whose freeze policy trains more than the new rows (None: off)
    pseudo_rows: list[dict] | None = None
    pseudo_rows_with_teacher: list[dict] | None = None

    def rows_for(self, method) -> list[dict]:
        """The rows a trial under ``method`` trains on: pseudo-labelled unless only the new
        rows train (``--freeze head``, as add_classes), with teacher embeddings when it distils."""
        if self.pseudo_rows is not None and method.freeze != "head":
            return self.pseudo_rows_with_teacher if method.distills else self.pseudo_rows
        return self.rows_with_teacher if method.distills else self.rows


@dataclass
class TrialPayload:
    """Everything a trial needs, built once on the driver and shipped by the object store."""

    draws: list[TrialDraw]               # every trial fine-tunes on each; its figure is their mean
    teacher_dim: int | None
    val: EvalSplit
    method: MethodOptions                 # the trials' freeze policy; the tuned keys are replaced
    train: TrainConfig                    # add_classes' schedule; lr and steps are replaced
    eval_every: int
    threads: int = 1
    gpus: float = 0.0       # GPUs per trial (0: CPU only; a fraction shares one GPU)
    precision: str = "auto"

    @property
    def device(self) -> str | None:
        """None (the trial's default device: its GPU) with GPUs, else the CPU, explicitly."""
        return None if self.gpus > 0 else "cpu"


def val_metrics(report: EvalReport) -> dict[str, float]:
    """The validation figures a trial reports (NaN, e.g. AP of a class val lacks, as 0)."""
    return {k: (0.0 if math.isnan(v) else float(v)) for k, v in
            ((k, getattr(report, k)) for k in VAL_KEYS)}


def run_trial(config: dict, payload: TrialPayload) -> None:
    """Tune function trainable: fine-tune each draw's start with ``config`` and report the
    **mean over the draws** of the val figures, every ``eval_every`` steps (and at the last),
    with ``step`` (the scheduler's time axis), the smoothed loss and the balancer's weights.

    The draws run one after the other; the earlier ones record their figures at each eval step
    and the last one reports the means as it reaches each step, so a configuration is judged on
    several support sets (one draw rewards whatever happens to fit it) while ASHA can still stop
    it during the last draw."""
    torch.set_num_threads(max(1, payload.threads))
    options, tcfg = apply_to(config, payload.method, replace(payload.train, log_every=payload.eval_every))
    method = options.config(payload.teacher_dim)
    if method.distills and any(d.rows_with_teacher is None for d in payload.draws):
        raise ValueError("this trial distils (beta > 0) but the search has no teacher")
    device = resolve_device(payload.device)
    precision = resolve_precision(payload.precision, device)
    earlier: dict[int, list[dict[str, float]]] = {}  # step -> figures of the draws done so far
    # every draw's start shares the parent's trunk: under a frozen-trunk policy its features
    # and proposals (support and val images) are computed once per actor, not once per
    # draw, eval and trial (fewshot.model.trunk_cache; exact)
    cache = _actor_trunk_cache(payload.draws[0].start) if use_trunk_cache(method.freeze, device) else None

    for i, draw in enumerate(payload.draws):
        last = i == len(payload.draws) - 1
        model = draw.start.build_model()
        rows = draw.rows_for(method)

        def on_eval(step: int, smoothed: dict[str, float], model=model, draw=draw, last=last) -> None:
            figures = val_metrics(score(to_checkpoint(model, draw.start), payload.val, device=device,
                                        precision=precision, trunk_cache=cache))
            if not last:
                earlier.setdefault(step, []).append(figures)
                return
            seen = earlier.get(step, []) + [figures]
            mean = {k: sum(f[k] for f in seen) / len(seen) for k in figures}
            tune.report({"step": step, **mean, "draws": len(seen), "lr": smoothed["lr"],
                         **{f"train_{k}": v for k, v in smoothed.items() if k != "lr"}})

        finetune(draw.start, rows, tcfg, method, seed=draw.seed, on_log=on_eval, model=model,
                 device=device, precision=precision, trunk_cache=cache)


_ACTOR_CACHES: dict[bytes, TrunkCache] = {}
# free the cached tensors while torch is still whole: left to the interpreter's teardown of
# module globals, they would be released after parts of torch are gone
atexit.register(_ACTOR_CACHES.clear)


def _actor_trunk_cache(start) -> TrunkCache:
    """The trunk cache of ``start``'s trunk in this process (Tune reuses a trial's actor for
    the next trial: the next one finds the support and val images' features already there)."""
    model = start.build_model()
    key = trunk_fingerprint(model)
    if key not in _ACTOR_CACHES:
        _ACTOR_CACHES.clear()  # another parent: drop the old trunk's features
        _ACTOR_CACHES[key] = TrunkCache()
    return _ACTOR_CACHES[key]


# ---- MLflow: one nested run per trial ----------------------------------------------------------

def _trial_name(index: int, config: dict) -> str:
    parent = f"-pd{config['parent_distill']:g}" if config.get("parent_distill") is not None else ""
    return (f"trial-{index:02d}-{config.get('freeze')}-{config.get('balancer')}-b{config.get('distill_beta', 0):g}"
            f"{parent}-lr{config.get('lr', 0):.1e}-{config.get('steps')}st")


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
        params = {**self.extra_params, **{k: trial.config.get(k) for k in CONFIG_KEYS}}
        self._safe("log params", self.client.log_batch, run.info.run_id,
                   params=[Param(k, "none" if v is None else str(v)) for k, v in params.items()])
        cfg = ", ".join(f"{k}={trial.config.get(k):.3g}" if isinstance(trial.config.get(k), float)
                        else f"{k}={trial.config.get(k)}" for k in CONFIG_KEYS)
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


def _summaries(results, logger: MlflowTrialLogger) -> list[TrialSummary]:
    out = []
    for r in results:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or (Path(r.path).name if r.path else "?")
        # only the keys the trial holds: a trial under a policy with no lambda has no parent_distill,
        # and a None there would not apply (tuned_configs.apply_to keeps the caller's weight instead)
        config = {k: r.config[k] for k in CONFIG_KEYS if k in r.config}
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




def run_search(payload: TrialPayload, space: dict, logger: MlflowTrialLogger, *, metric: str,
               num_samples: int, max_concurrent: int, cpus_per_trial: int, max_steps: int, grace: int,
               gpus_per_trial: float = 0.0,
               reduction_factor: float, seed: int, name: str, storage_path: str | None = None,
               storage_filesystem=None, verbose: int = 1,
               points: Sequence[dict] = ()) -> list[TrialSummary]:
    """Run the trials (random search seeded with ``seed``, ASHA on val ``metric``); returns
    one summary per trial. ``points``: whole configurations run first, before the sampled ones
    (they count in ``num_samples``)."""
    resources = {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial > 0 else {})}
    trainable = tune.with_resources(tune.with_parameters(run_trial, payload=payload), resources)
    scheduler = ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=grace,
                              reduction_factor=reduction_factor)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                    # seeded random search; it enforces the concurrency limit itself
                                    # (TuneConfig.max_concurrent_trials is ignored with a
                                    # BasicVariantGenerator)
                                    search_alg=BasicVariantGenerator(random_state=seed,
                                                                     max_concurrent=max_concurrent,
                                                                     points_to_evaluate=[dict(p) for p in points]),
                                    num_samples=num_samples,
                                    # a trial's actor has torch and the payload loaded: reuse it
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  callbacks=[logger], verbose=verbose),
    )
    return _summaries(tuner.fit(), logger)


def _finetune_and_score(episode, cfg: TrainConfig, method, split: EvalSplit, threads: int,
                        gpus: float = 0.0, precision: str = "auto", train_rows: list[dict] | None = None,
                        scoring: str = "joint") -> dict:
    """One fine-tune of a comparison: expand (imprint from ``episode``, the child scoring its
    classes by ``scoring``), fine-tune on ``train_rows`` (default: the episode's rows;
    pre-embedded when the method distils), score on ``split``, on the task's GPU when it holds
    one, else the CPU."""
    torch.set_num_threads(max(1, threads))
    device = resolve_device(None if gpus > 0 else "cpu")
    precision = resolve_precision(precision, device)
    start = expand_parent(episode, device=device, scoring=scoring)
    cache = TrunkCache() if use_trunk_cache(method.freeze, device) else None
    model = finetune(start, episode.rows if train_rows is None else train_rows, cfg, method, seed=episode.seed,
                     device=device, precision=precision, trunk_cache=cache)
    return val_metrics(score(to_checkpoint(model, start), split, device=device, precision=precision,
                             trunk_cache=cache))


def run_finetunes(jobs: dict, split: EvalSplit, cpus: int, on_done=None, *, gpus: float = 0.0,
                  precision: str = "auto", scoring: str = "joint") -> dict:
    """``jobs``: key -> (episode, TrainConfig, MethodConfig, training rows or None: the
    episode's), each child scoring its classes by ``scoring``; one Ray task each (``cpus`` CPUs,
    ``gpus`` GPUs), ``split`` shipped once; returns key -> figures (``on_done(key, figures,
    done, total)`` as they come)."""
    split_ref = ray.put(split)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_finetune_and_score)
    pending = {task.remote(ep, cfg, method, split_ref, cpus, gpus, precision, rows, scoring): key
               for key, (ep, cfg, method, rows) in jobs.items()}
    out, waiting = {}, list(pending)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        key = pending[ready[0]]
        out[key] = ray.get(ready[0])
        if on_done is not None:
            on_done(key, out[key], len(out), len(pending))
    return out
