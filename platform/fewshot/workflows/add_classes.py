"""Teach the champion detector new classes from K shots each, gate the child, register it,
and move ``champion`` last.

validate → plan → run, and the plan carries what validation read (the champion, its
checkpoint, the catalog manifest, the train split, the val and test splits, the teacher), so
nothing is read twice:

1. :func:`validate` runs every check before anything is written: known classes, not already
   served, enough annotated instances for K shots, a val split to gate on, a teacher that
   loads, a method that can act under the freeze policy (a balancer or distillation with
   ``--freeze head`` would change nothing: refused), and the parent's own refiner loadable
   (the parent is judged as it is served). It returns a :class:`Plan`.
2. :func:`run_add_classes` samples the K-shot support set (plus K replay exemplars of every
   old class), refuses when a support image is also an evaluation image, imprints one
   classifier row per new class, lets the parent label the objects of its own classes the
   sample left unannotated when the fine-tune trains more than the new rows
   (:mod:`fewshot.learning.pseudo_labels`), fine-tunes on Ray Train, fits CLIP refinement on val when a
   teacher is given, and scores parent and child **as each is served** (refined when the
   version has a refiner) and **unrefined**, on the **val** split. The gate
   (:class:`fewshot.workflows.gate.GateRule`) decides on those val figures only; the test
   split, when the dataset has one, is scored and reported, never used to decide.
3. Registration: the version is registered with every tag, its description and
   ``incomplete=true``; then the alias moves through the model's promotion actor
   (:mod:`fewshot.backends.promotion`: a compare-and-set, serialised per model), and only
   then is the child's class set written to the catalog. A job killed at any point leaves
   the aliases, the catalog and the served model as they were.
"""
from __future__ import annotations

import difflib
import json
import tempfile
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Annotated

import pyarrow as pa

from catalog import IMAGE_SCHEMA, Catalog, DatasetManifest
from catalog.class_sets import ClassSet, ClassSetNotFound, extend, load_class_set, save_class_set
from catalog.kshot import count_instances, sample_support
from catalog.overlap import SharedImagesError, assert_disjoint
from catalog.schema import TEACHER_EMB_COLUMN
from fewshot.backends import promotion, ray_train, registry, tracking
from fewshot.backends.cluster import ClusterOptions, ensure_ray, predict_on
from fewshot.model.cosine_head import AUTO_SCORINGS
from fewshot.model.trunk_cache import TrunkCache, use_trunk_cache
from fewshot.backends.ray_train import PRECISION_KEY
from fewshot.clip.refinement import EXTRA_KEY as REFINER_KEY
from fewshot.learning.bias_correction import DEFAULT_OFFSETS, fit_new_row_offset
from fewshot.learning.episode import (
    Episode, expand_parent, pseudo_label_episode, refine_checkpoint_file, score,
)
from fewshot.learning.loop import TrainConfig
from fewshot.learning.method import MethodConfig, MethodOptions, TeacherEmbedder
from fewshot.learning.freezing import BOX_HEAD_TRAINS
from fewshot.metrics.coco_eval import EvalReport, EvalSplit, load_eval_split
from fewshot.model.checkpoint import DetectorCheckpoint, load_checkpoint, save_checkpoint, update_extra
from fewshot.workflows.faults import kill_point
from fewshot.workflows.gate import GateFigures, GateRule, describe_version
from fewshot.workflows.options import Flat, NameList, StoreOptions


class AddClassesError(ValueError):
    """Bad input to add_classes; nothing was written."""


@dataclass(frozen=True)
class AddClassesOptions:
    """Add classes to the served detector from K shots each: expand the champion's classifier,
    fine-tune with Ray Train, score parent and child on val as each is served, register version
    N+1 and make it 'champion' only if the base classes held up (test figures are reported)."""

    classes: NameList = ()
    """Comma-separated class names from the catalog to add (required)."""
    shots: int = 5
    """K: annotated instances per new class."""
    seed: int = 0
    """Seed of the K-shot sample and of training."""
    dataset: str | None = None
    """Dataset (default: the champion's)."""
    replay: bool = True
    """Fine-tune on K replay exemplars of every old class too (--no-replay: the novel shots only)."""
    max_base_drop: float = 0.05
    """Gate: the largest drop of base-class AP50 on val allowed, as served (parent and child each
    refined when it has a refiner)."""
    max_detector_drop: float = 0.05
    """Gate: the largest drop of base-class AP50 on val allowed for the detector alone
    (unrefined), so a refiner cannot hide a detector that forgot the old classes."""
    bias_correction: float | None = 0.01
    """Bias correction (BiC) of the new classes' logits: after fine-tuning, choose on val the
    smallest negative offset of the new rows' logits that keeps the base AP50 within this much
    of the parent's (0.01: one point): the detector's, or with a --teacher that refines, the
    version's as served while the detector alone stays within --max-detector-drop; the offset
    travels in the checkpoint. The choice and every offset's val figures go to MLflow. None
    turns it off."""
    pseudo_labels: float | None = 0.9
    """Old-class pseudo-labels: before fine-tuning, the parent's detections of its own classes
    with at least this score are added to the support images as annotations (one per object,
    never over a box of the dataset), because the K-shot sample annotates only the object each
    image was taken for and a fine-tune that trains the box head or the RPN would learn that
    the old classes' other objects are background. Applied when --freeze trains more than the
    new classifier rows (rpn, backbone, rpn-head, none); with --freeze head nothing it could change
    trains, so it is skipped. None turns it off. The count added goes to MLflow."""
    retain_heads: bool = True
    """Keep a frozen copy of the parent's RoI head (box head, box regressor, classifier) in the
    child to answer the old classes under per-increment scoring, each with the score and box the
    parent served (Retentive R-CNN's base branch, one per increment; needs the backbone and RPN
    frozen, --freeze backbone or head, to be exact). Costs one more box head per increment at
    inference; under joint scoring it is dropped. --no-retain-heads: the child's own head answers
    every class."""
    tuned_config: str | None = None
    """'best': the configuration jobs/tune.py stored for --model-name (balancer, momentum, beta,
    lr, steps and the freeze policy it was tuned under override the flags); or a JSON file with
    those keys. The version records which configuration it came from."""
    config_file: str | None = None
    """A YAML file of these options (flag names, flat or grouped); flags given beside it win."""
    store: Annotated[StoreOptions, Flat] = field(
        default_factory=lambda: StoreOptions(experiment="fewshot-add-classes"))
    cluster: Annotated[ClusterOptions, Flat] = field(
        default_factory=lambda: ClusterOptions(num_workers=1, cpus_per_worker=2))
    method: Annotated[MethodOptions, Flat] = field(default_factory=MethodOptions)
    train: Annotated[TrainConfig, Flat] = field(
        default_factory=lambda: TrainConfig(steps=150, batch_size=8, lr=5e-4, warmup_steps=20, log_every=10))
    max_val_images: int | None = 150
    """Val images the gate and the refinement fusion weight use (None: all)."""
    max_test_images: int | None = None
    """Test images the reported figures use (None: all)."""


@dataclass
class Plan:
    """What validation established and read; nothing has been written yet."""

    opts: AddClassesOptions
    config_source: str
    parent: registry.VersionInfo
    parent_ckpt: DetectorCheckpoint
    parent_refiner: object | None          # the parent's own refiner, teacher loaded
    manifest: DatasetManifest
    train_table: pa.Table
    new_classes: list[str]
    new_ids: list[int]
    old_ids: list[int]
    teacher: object | None                 # the loaded CLIP teacher (--teacher)
    method: MethodConfig
    val: EvalSplit                         # base + new classes: gate and fusion weight
    test: EvalSplit | None                 # base + new classes: reported only
    work: Path                             # removed when the job ends

    @property
    def dataset(self) -> str:
        return self.manifest.name

    @property
    def refine(self) -> bool:
        return bool(self.opts.method.refine and self.teacher is not None)


@dataclass
class AddClassesResult:
    version: registry.VersionInfo
    promoted: bool
    reason: str
    gate: GateFigures
    child: dict                   # reported figures (test, else val), as served
    timings: dict = field(default_factory=dict)  # stage -> seconds (also MLflow metrics time/<stage>_s)
    precision: str = "fp32"       # the precision the child trained and was evaluated in (version tag)


STAGES = ("validate", "expand", "finetune", "bias_correction", "scoring", "refine_fit", "evaluate", "register")


class _Clock:
    """Wall time per stage: ``with clock("finetune"): ...``; ``clock.timings`` in seconds."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._open: tuple[str, float] | None = None

    def start(self, stage: str) -> None:
        import time

        self._open = (stage, time.perf_counter())

    def stop(self) -> None:
        import time

        if self._open is not None:
            stage, t0 = self._open
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0
            self._open = None

    def __call__(self, stage: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def timed():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

        return timed()


def apply_tuned_config(opts: AddClassesOptions, mlflow_uri: str) -> tuple[AddClassesOptions, str]:
    """``opts`` with the tuned values of ``opts.tuned_config`` applied; ``(opts, source)``.

    A config stored by ``jobs/tune.py`` (``best``) also brings the freezing policy its trials
    trained with (the balancer and beta act only where the box head trains)."""
    if not opts.tuned_config:
        return opts, "flags"
    from fewshot.backends.tuned_configs import apply_to, load_best_record, load_config

    try:
        cfg, source = load_config(opts.tuned_config, mlflow_uri, opts.store.model_name)
        freeze = opts.method.freeze
        if opts.tuned_config.strip() == "best":
            tuned_for = load_best_record(mlflow_uri, opts.store.model_name).get("tuned_for", {})
            freeze = tuned_for.get("freeze", freeze)
    except ValueError as err:
        raise AddClassesError(f"--tuned-config {opts.tuned_config}: {err}") from None
    method, train = apply_to(cfg, dc_replace(opts.method, freeze=freeze), opts.train)
    return dc_replace(opts, method=method, train=train), source


def _check_method(method: MethodOptions) -> None:
    try:
        method.check()
    except ValueError as err:
        raise AddClassesError(str(err)) from None
    if method.freeze not in BOX_HEAD_TRAINS and (method.balancer or method.distill_beta > 0):
        what = " and ".join(w for w in (f"--balancer {method.balancer}" if method.balancer else "",
                                       f"--distill-beta {method.distill_beta:g}" if method.distill_beta > 0 else "") if w)
        raise AddClassesError(
            f"{what} act on the shared RoI feature, which does not train with --freeze {method.freeze} (only "
            f"the new classifier rows{' and the RPN' if method.freeze == 'rpn' else ''} do): it would change nothing. "
            "Pass --freeze backbone (box head trains), rpn-head or none, or drop it")


def _load_parent_refiner(ckpt: DetectorCheckpoint, teacher) -> object | None:
    """The refiner the parent is served with (its teacher loaded), or None if it has none."""
    if REFINER_KEY not in ckpt.extra:
        return None
    from fewshot.clip.refinement import Refiner

    try:
        stored = ckpt.extra[REFINER_KEY]
        same = teacher is not None and stored.get("teacher_id") == teacher.id
        refiner = Refiner.from_extra(ckpt.extra, teacher=teacher if same else None)
        refiner.teacher  # load it now: a gate that cannot judge the parent as served must not run
        return refiner
    except Exception as err:  # noqa: BLE001 - any failure means "cannot judge like for like"
        raise AddClassesError(
            f"the champion is served with CLIP refinement (teacher "
            f"{ckpt.extra[REFINER_KEY].get('teacher_spec') or '?'}), which cannot be loaded here ({err}); "
            "the gate compares parent and child as each is served: make that teacher available "
            "(--teacher with the same spec)") from None


def validate(opts: AddClassesOptions) -> Plan:
    """Every input check, before any write; returns the plan with what it read.
    Raises :class:`AddClassesError` with a clear message."""
    store = opts.store
    try:
        store.check()
        opts.cluster.check()
    except ValueError as err:
        raise AddClassesError(str(err)) from None
    opts, config_source = apply_tuned_config(opts, store.mlflow_uri)
    if opts.shots < 1:
        raise AddClassesError(f"--shots must be at least 1, got {opts.shots}")
    if opts.bias_correction is not None and not 0.0 <= opts.bias_correction < 1.0:
        raise AddClassesError(f"--bias-correction is a drop of base AP50 (a fraction, 0 <= d < 1), "
                              f"got {opts.bias_correction}")
    if opts.pseudo_labels is not None and not 0.0 < opts.pseudo_labels <= 1.0:
        raise AddClassesError(f"--pseudo-labels is a detection score threshold (0 < t <= 1), got "
                              f"{opts.pseudo_labels}")
    if not opts.classes:
        raise AddClassesError("--classes is empty: name at least one class to add")
    classes = list(opts.classes)
    dupes = sorted({c for c in classes if classes.count(c) > 1})
    if dupes:
        raise AddClassesError(f"--classes names {dupes} more than once")
    _check_method(opts.method)
    parent = registry.get_alias(store.mlflow_uri, store.model_name, registry.CHAMPION)
    if parent is None:
        raise AddClassesError(
            f"registered model {store.model_name!r} has no '{registry.CHAMPION}' version at "
            f"{store.mlflow_uri}: run jobs/base_train.py first")
    dataset = opts.dataset or parent.tags.get("dataset")
    if not dataset:
        raise AddClassesError("the champion version has no 'dataset' tag: pass --dataset")
    catalog = Catalog(store.catalog)
    try:
        manifest = catalog.manifest(dataset)
    except KeyError as err:
        raise AddClassesError(str(err.args[0] if err.args else err)) from None
    by_name = manifest.category_by_name()
    unknown = [c for c in classes if c not in by_name]
    if unknown:
        hints = {c: difflib.get_close_matches(c, list(by_name), n=3) for c in unknown}
        hint = "; ".join(f"{c!r}: did you mean {h}?" for c, h in hints.items() if h)
        raise AddClassesError(
            f"unknown class(es) {unknown} for dataset {dataset!r}"
            + (f" ({hint})" if hint else f" (known: {sorted(by_name)})"))
    present = [c for c in classes if c in parent.classes]
    if present:
        raise AddClassesError(
            f"class(es) {present} are already in the champion class set "
            f"(version {parent.version}, class set {parent.class_set})")
    if not manifest.splits.get("val"):
        raise AddClassesError(f"dataset {dataset!r} has no val split: the gate and the refinement "
                              "fusion weight are chosen on val (re-import it with a val split)")
    new_ids = [by_name[c].id for c in classes]
    train_table = catalog.read_split(dataset, "train")
    counts = count_instances(train_table, new_ids)
    short = {c: counts.get(by_name[c].id, 0) for c in classes if counts.get(by_name[c].id, 0) < opts.shots}
    if short:
        raise AddClassesError(
            f"too few annotated instances in {dataset!r}/train for {opts.shots} shots: "
            + ", ".join(f"{c} has {n}" for c, n in short.items()))
    teacher = None
    if opts.method.teacher:
        from fewshot.clip.teacher import load_teacher

        try:
            teacher = load_teacher(opts.method.teacher)
        except (OSError, ValueError, RuntimeError) as err:
            raise AddClassesError(f"--teacher {opts.method.teacher!r} could not be loaded: {err}") from None

    work = Path(tempfile.mkdtemp(prefix="fewshot-add-"))
    try:
        path = registry.download_checkpoint(store.mlflow_uri, store.model_name, parent.version, work / "parent")
        parent_ckpt = load_checkpoint(path)
        if parent_ckpt.classes != parent.classes:
            raise AddClassesError(f"version {parent.version}: registry tags and checkpoint disagree on "
                                  "the class list")
        parent_refiner = _load_parent_refiner(parent_ckpt, teacher)
        base_names = list(parent_ckpt.classes)
        val = load_eval_split(catalog, dataset, "val", base_names, classes, max_images=opts.max_val_images)
        test = (load_eval_split(catalog, dataset, "test", base_names, classes, max_images=opts.max_test_images)
                if manifest.splits.get("test") else None)
    except BaseException:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        raise
    return Plan(opts=opts, config_source=config_source, parent=parent, parent_ckpt=parent_ckpt,
                parent_refiner=parent_refiner, manifest=manifest, train_table=train_table,
                new_classes=classes, new_ids=new_ids, old_ids=[by_name[c].id for c in parent.classes],
                teacher=teacher, method=opts.method.config(teacher.embed_dim if teacher is not None else None),
                val=val, test=test, work=work)


@dataclass
class _Scores:
    served: EvalReport
    unrefined: EvalReport


def _score_both(ckpt: DetectorCheckpoint, split: EvalSplit, refiner, cluster: ClusterOptions,
                trunk_cache: TrunkCache | None = None) -> _Scores:
    """One prediction pass (on the job's device, in the version's own precision); the served
    figures apply ``refiner`` when there is one."""
    results = predict_on(cluster, ckpt, split, ckpt.extra.get(PRECISION_KEY, "fp32"), trunk_cache)
    raw = score(ckpt, split, results=results)
    return _Scores(served=score(ckpt, split, refiner=refiner, results=results) if refiner is not None else raw,
                   unrefined=raw)


def run_add_classes(opts: AddClassesOptions) -> AddClassesResult:
    clock = _Clock()
    with clock("validate"):
        plan = validate(opts)
    try:
        return _run(plan, clock)
    finally:
        import shutil

        shutil.rmtree(plan.work, ignore_errors=True)


def _run(plan: Plan, clock: _Clock | None = None) -> AddClassesResult:
    clock = clock or _Clock()
    opts, store = plan.opts, plan.opts.store
    catalog = Catalog(store.catalog)
    parent_ckpt = plan.parent_ckpt
    child_classes = parent_ckpt.classes + plan.new_classes
    child_ids = parent_ckpt.category_ids + plan.new_ids
    try:
        parent_cs = load_class_set(catalog, parent_ckpt.class_set)
    except ClassSetNotFound:  # a parent registered from another catalog
        parent_cs = ClassSet.create(plan.dataset, parent_ckpt.classes)
    class_set = extend(parent_cs, plan.new_classes)

    clock.start("expand")
    novel_rows, replay_rows = sample_support(plan.train_table, plan.new_ids, plan.old_ids, opts.shots,
                                             opts.seed, replay=opts.replay)
    for split, name in ((plan.val, "val"), (plan.test, "test")):
        if split is not None:
            try:
                assert_disjoint(novel_rows + replay_rows, split.rows, support_name="support",
                                eval_name=f"{plan.dataset}/{name}")
            except SharedImagesError as err:
                raise AddClassesError(f"{err} (re-import the dataset: the importer keeps every image in "
                                      "one split only)") from None
    episode = Episode(parent=parent_ckpt, dataset=plan.dataset, new_classes=plan.new_classes,
                      new_ids=plan.new_ids, shots=opts.shots, seed=opts.seed,
                      novel_rows=novel_rows, replay_rows=replay_rows)
    start = expand_parent(episode, device=opts.cluster.device(),  # one imprinted row per new class
                          scoring=_trained_scoring(opts.method.scoring), retain_head=opts.retain_heads)
    pseudo = None
    if opts.pseudo_labels is not None and plan.method.freeze != "head":
        episode, pseudo = pseudo_label_episode(episode, opts.pseudo_labels, device=opts.cluster.device())
        novel_rows, replay_rows = episode.novel_rows, episode.replay_rows
        print(f"the parent labelled {pseudo.added} objects of its own classes (score >= {opts.pseudo_labels:g}) "
              f"on the {pseudo.images} support images, beside their {pseudo.annotated} annotations", flush=True)
    # the parent's refiner knew the old classes only: the child gets its own (or none)
    extra = {k: v for k, v in parent_ckpt.extra.items() if k != REFINER_KEY}
    init_path = save_checkpoint(plan.work / "init.pt", start.build_model(), start.config, child_classes,
                                child_ids, plan.dataset, class_set.id, extra)
    method = plan.method
    clock.stop()

    ensure_ray(opts.cluster.ray_address)
    run_name = f"add-{'+'.join(plan.new_classes)}-{opts.shots}shot-s{opts.seed}"
    with tracking.start_run(store.mlflow_uri, store.experiment, run_name,
                            tags={"job": "add_classes", "parent_version": str(plan.parent.version),
                                  "class_set": class_set.id}) as run:
        tracking.log_params({
            "dataset": plan.dataset, "new_classes": plan.new_classes, "shots": opts.shots,
            "seed": opts.seed, "parent_version": plan.parent.version,
            "replay": opts.replay, "novel_images": len(novel_rows), "replay_images": len(replay_rows),
            "max_base_drop": opts.max_base_drop, "max_detector_drop": opts.max_detector_drop,
            "bias_correction": "off" if opts.bias_correction is None else opts.bias_correction,
            "pseudo_labels": "off" if pseudo is None else opts.pseudo_labels,
            "pseudo_labels_added": 0 if pseudo is None else pseudo.added,
            "teacher": plan.teacher.id if plan.teacher is not None else "none",
            "refine": plan.refine, "config_source": plan.config_source, "retain_heads": opts.retain_heads,
            "val_images": len(plan.val.rows), "test_images": len(plan.test.rows) if plan.test else 0,
            **{k: ("none" if v is None else v) for k, v in method.to_dict().items()},
            **opts.train.to_dict(), "gpu": opts.cluster.gpu, "gpus_per_worker": opts.cluster.gpus,
            "precision_option": opts.cluster.precision, "scoring": opts.method.scoring,
        })
        rows = novel_rows + replay_rows
        clock.start("finetune")
        schema = IMAGE_SCHEMA
        if method.distills:
            print(f"embedding {sum(len(r['boxes']) for r in rows)} support boxes with the teacher ...",
                  flush=True)
            rows = TeacherEmbedder(plan.teacher)(rows)
            schema = schema.append(pa.field(TEACHER_EMB_COLUMN, pa.list_(pa.list_(pa.float32()))))
        dataset = ray_train.dataset_from_rows(rows, schema)
        spec = ray_train.TrainJobSpec(
            init_checkpoint=str(init_path), train=opts.train, seed=opts.seed, method=method,
            mlflow_tracking_uri=store.mlflow_uri,
            mlflow_run_id=run.info.run_id, metric_prefix="finetune/",
        )
        print(f"fine-tuning on {len(novel_rows)} novel + {len(replay_rows)} replay images "
              f"({opts.shots} shots, freeze={method.freeze}, balancer={method.balancer or 'none'}, "
              f"distill beta={method.distill_beta:g}, parent distillation lambda={method.parent_distill:g}, "
              f"scoring={opts.method.scoring}) ...",
              flush=True)
        final = ray_train.fit(spec, dataset, opts.cluster, out_dir=plan.work / "child",
                              name=f"add-{run.info.run_id[:8]}")
        clock.stop()
        kill_point("after_finetune")
        child_ckpt = load_checkpoint(final)
        precision = child_ckpt.extra.get(PRECISION_KEY, "fp32")  # what the worker trained in
        # parent and child share the trunk when it was frozen: score its features once per image
        eval_cache = TrunkCache() if use_trunk_cache(method.freeze, opts.cluster.device()) else None
        parent_val_split = _base_only(plan.val)
        parent_val = None
        bias_tags: dict[str, str] = {}
        child_val_results = None
        refiner = None
        if opts.bias_correction is not None or opts.method.scoring == "auto":
            with clock("evaluate"):
                parent_val = _score_both(parent_ckpt, parent_val_split, plan.parent_refiner, opts.cluster,
                                         eval_cache)
            # "scoring": with --bias-correction None, only auto's choice of scoring (at offset 0)
            with clock("bias_correction" if opts.bias_correction is not None else "scoring"):
                # the grid's detections at the chosen offset (and scoring) are the corrected child's
                # on val; when refining, the rule is judged as served and the chosen refiner is kept
                child_ckpt, bias_tags, child_val_results, refiner = _choose_on_val(
                    final, child_ckpt, plan, parent_val, precision, eval_cache)
        if child_val_results is None:
            with clock("evaluate"):
                child_val_results = predict_on(opts.cluster, child_ckpt, plan.val, precision, eval_cache)
        if plan.refine:
            with clock("refine_fit"):
                if refiner is None:
                    refiner = refine_checkpoint_file(final, plan.teacher, plan.val, child_val_results)
                else:
                    update_extra(final, refiner.to_extra())
                child_ckpt = load_checkpoint(final)
        refine_tags = tracking.log_refinement(refiner) if refiner is not None else {}

        # the gate: val only, parent and child each as served and unrefined
        print(f"scoring parent and child on {len(plan.val.rows)} val images (the gate) ...", flush=True)
        clock.start("evaluate")
        if parent_val is None:
            parent_val = _score_both(parent_ckpt, parent_val_split, plan.parent_refiner, opts.cluster,
                                     eval_cache)
        child_val_raw = score(child_ckpt, plan.val, results=child_val_results)
        child_val = _Scores(served=score(child_ckpt, plan.val, refiner=refiner, results=child_val_results)
                            if refiner is not None else child_val_raw, unrefined=child_val_raw)
        rule = GateRule(max_served_drop=opts.max_base_drop, max_detector_drop=opts.max_detector_drop)
        figures = GateFigures(
            split="val", images=len(plan.val.rows),
            parent_served=parent_val.served.bAP50, child_served=child_val.served.bAP50,
            parent_unrefined=parent_val.unrefined.bAP50, child_unrefined=child_val.unrefined.bAP50,
            parent_refined=plan.parent_refiner is not None, child_refined=refiner is not None,
            child_nAP50=child_val.served.nAP50)
        passed, reason = rule.decide(figures)
        tracking.log_eval_report(parent_val.served, prefix="parent_val_")
        tracking.log_eval_report(child_val.served, prefix="val_", novel=set(plan.new_classes),
                                 parent_per_class=parent_val.served.per_class_AP50)
        tracking.log_metrics({f"unrefined_val_{k}": v for k, v in child_val.unrefined.headline().items()})
        tracking.log_metrics(figures.metrics())

        # the report: test, never used to decide
        reported = child_val.served
        report_tags = {"report_split": "val (the dataset has no test split; these figures are the "
                                       "ones the gate used)"}
        if plan.test is not None:
            print(f"reporting on {len(plan.test.rows)} test images ...", flush=True)
            parent_test = _score_both(parent_ckpt, _base_only(plan.test), plan.parent_refiner, opts.cluster,
                                      eval_cache)
            child_test = _score_both(child_ckpt, plan.test, refiner, opts.cluster, eval_cache)
            tracking.log_eval_report(parent_test.served, prefix="parent_test_")
            tracking.log_eval_report(child_test.served, prefix="test_", novel=set(plan.new_classes),
                                     parent_per_class=parent_test.served.per_class_AP50)
            tracking.log_metrics({f"unrefined_test_{k}": v for k, v in child_test.unrefined.headline().items()})
            reported = child_test.served
            report_tags = {"report_split": "test", "parent_test_bAP50": f"{parent_test.served.bAP50:.4f}",
                           "unrefined_test_bAP50": f"{child_test.unrefined.bAP50:.4f}",
                           "unrefined_test_nAP50": f"{child_test.unrefined.nAP50:.4f}"}

        clock.stop()
        clock.start("register")
        method_tags = {"balancer": method.balancer or "none", "distill_beta": f"{method.distill_beta:g}",
                       "parent_distill": f"{method.parent_distill:g}",
                       "freeze": method.freeze, "config_source": plan.config_source,
                       "scoring": _trained_scoring(opts.method.scoring),   # auto: bias_tags say which
                       "scoring_option": opts.method.scoring,
                       "retained_heads": str(_served_retained_heads(child_ckpt)),
                       "pseudo_labels": "off" if pseudo is None else f"{opts.pseudo_labels:g}:{pseudo.added}",
                       "config": json.dumps({**method.to_dict(), "lr": opts.train.lr,
                                             "steps": opts.train.steps}, sort_keys=True)}
        description = describe_version(plan.new_classes, plan.parent.version, opts.shots, passed, reason,
                                       figures, reported, report_tags["report_split"])
        version = registry.register_detector(
            store.mlflow_uri, store.model_name, final, classes=child_classes, class_set=class_set.id,
            parent_version=plan.parent.version, shots=opts.shots, description=description,
            extra_tags={"dataset": plan.dataset, "job": "add_classes", "seed": str(opts.seed),
                        "new_classes": ",".join(plan.new_classes), "gate": "passed" if passed else "failed",
                        "gate_reason": reason, "gate_rule": rule.describe(),
                        "gate_figures": json.dumps(figures.to_dict(), sort_keys=True),
                        "parent_bAP50": f"{figures.parent_served:.4f}",
                        "bAP50_change": f"{figures.served_change:.4f}",
                        "bAP50_change_unrefined": f"{figures.unrefined_change:.4f}",
                        promotion.INCOMPLETE_TAG: "true", PRECISION_KEY: precision,
                        **method_tags, **refine_tags, **bias_tags, **report_tags,
                        **tracking.eval_tags(reported)},
        )
        kill_point("after_register")
        decision = promotion.promote(store.mlflow_uri, store.model_name, version.version,
                                     expected_champion=plan.parent.version, want_champion=passed,
                                     reason=reason)
        save_class_set(catalog, class_set)  # after the alias: a job killed before leaves the catalog as it was
        tracking.set_tags({"registered_version": str(version.version), "alias": decision.alias,
                           PRECISION_KEY: precision})
        clock.stop()
        tracking.log_metrics({f"time/{k}_s": v for k, v in clock.timings.items()})

    print(f"gate (val, {figures.images} images): {reason}", flush=True)
    print(f"child ({report_tags['report_split'].split(' ')[0]}): nAP50={reported.nAP50:.4f} "
          f"bAP50={reported.bAP50:.4f} nAP={reported.nAP:.4f} bAP={reported.bAP:.4f}"
          + (f" (CLIP refinement, fusion weight {refiner.fusion_weight:g})" if refiner else ""), flush=True)
    if decision.promoted:
        print(f"registered {store.model_name} version {version.version} as 'champion' "
              f"(parent {plan.parent.version})", flush=True)
    else:
        print(f"registered {store.model_name} version {version.version} as 'candidate', NOT promoted: "
              f"{decision.reason}", flush=True)
    version = registry.get_version(store.mlflow_uri, store.model_name, version.version)
    print("stage wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in clock.timings.items()), flush=True)
    return AddClassesResult(version=version, promoted=decision.promoted, reason=decision.reason,
                            gate=figures, child=reported.headline(), timings=dict(clock.timings),
                            precision=precision)


def _served_retained_heads(ckpt: DetectorCheckpoint) -> int:
    """How many retained heads answer old classes in the version as served (0 under joint
    scoring, which ignores them; :mod:`fewshot.model.retained_heads`)."""
    state = ckpt.state_dict
    if not bool(state.get("roi_heads.box_predictor.cls_score.per_increment_scores", False)):
        return 0
    return len({k.split(".")[3] for k in state if k.startswith("roi_heads.retained.heads.")})


def _trained_scoring(option: str) -> str:
    """The scoring a child starts with (and keeps unless ``--scoring auto`` chooses on val)."""
    return "joint" if option == "auto" else option


def _choose_on_val(path: Path, child_ckpt: DetectorCheckpoint, plan: Plan, parent_val: "_Scores",
                   precision: str, trunk_cache: TrunkCache | None):
    """Choose the new rows' logit offset on val (:mod:`fewshot.learning.bias_correction`) and,
    with ``--scoring auto``, the scoring (each with its own offset, from one prediction pass);
    write them into the checkpoint at ``path``, log the choice; returns the corrected
    checkpoint, the version tags that record it, its val detections and, when the version will
    be refined, the refiner fitted on those detections (the rule is then judged as served).
    With ``--bias-correction None`` only offset 0 is tried, against the gate's
    ``--max-base-drop``. Runs where the driver evaluates (its GPU with --gpu when it has one,
    else the CPU)."""
    from fewshot.clip.refinement import fit_refiner

    opts = plan.opts
    model = child_ckpt.build_model()
    parent_bAP50 = parent_val.unrefined.bAP50
    correcting = opts.bias_correction is not None
    allowance = opts.bias_correction if correcting else opts.max_base_drop
    scorings = AUTO_SCORINGS if opts.method.scoring == "auto" else (opts.method.scoring,)
    refiners: dict[tuple[str, float], object] = {}
    classifier = model.roi_heads.box_predictor.cls_score

    def served(offset: float, results: list[dict]) -> dict:
        refiner = fit_refiner(plan.teacher, child_ckpt.classes, child_ckpt.category_ids, plan.val, results)
        refiners[classifier.scoring, offset] = refiner
        row = next(r for r in refiner.selection["grid"] if r["lambda"] == refiner.fusion_weight)
        print(f"  {classifier.scoring} scoring, offset {offset:g}: val base AP50 as served {row['bAP50']:.4f} "
              f"(fusion weight {refiner.fusion_weight:g})", flush=True)
        return row

    what = "the new classes' logit offset" if correcting else "no offset"
    if len(scorings) > 1:
        what += " and the scoring (joint or per-increment)"
    if plan.refine:
        print(f"choosing {what} on {len(plan.val.rows)} val images (as served with "
              f"CLIP refinement: base AP50 within {allowance:g} of the parent's "
              f"{parent_val.served.bAP50:.4f}, the detector alone within {opts.max_detector_drop:g} of "
              f"{parent_bAP50:.4f}) ...", flush=True)
    else:
        print(f"choosing {what} on {len(plan.val.rows)} val images "
              f"(base AP50 within {allowance:g} of the parent's {parent_bAP50:.4f}) ...", flush=True)
    choice = fit_new_row_offset(model, plan.val, child_ckpt.category_ids, parent_bAP50, allowance,
                                offsets=DEFAULT_OFFSETS if correcting else (0.0,),
                                served=served if plan.refine else None,
                                parent_served_bAP50=parent_val.served.bAP50,
                                max_detector_drop=opts.max_detector_drop, scorings=scorings,
                                device=opts.cluster.device(), precision=precision, trunk_cache=trunk_cache)
    if choice.scoring == "joint":
        model.roi_heads.retained.clear()   # ignored under joint scoring: not served, not kept
    save_checkpoint(path, model, child_ckpt.config, child_ckpt.classes, child_ckpt.category_ids,
                    child_ckpt.dataset, child_ckpt.class_set, child_ckpt.extra)
    tags = tracking.log_bias_correction(choice) if correcting else {}
    if len(scorings) > 1:
        tags |= tracking.log_scoring_choice(choice)
    row = next(r for r in choice.table if r["offset"] == choice.offset)
    print(f"{choice.scoring} scoring, new rows' logit offset {choice.offset:g}: val bAP50 {row['bAP50']:.4f} "
          f"nAP50 {row['nAP50']:.4f}"
          + (f", as served {row['served_bAP50']:.4f}" if "served_bAP50" in row else "")
          + ("" if choice.met else " (nothing tried meets the rule; the best balance of base and new AP50)"),
          flush=True)
    if len(scorings) > 1:
        print("  val per scoring: " + "; ".join(
            f"{c['scoring']} offset {c['offset']:g} bAP50 {c['bAP50']:.4f} nAP50 {c['nAP50']:.4f} "
            f"{'met' if c['met'] else 'not met'}" for c in choice.candidates), flush=True)
    return load_checkpoint(path), tags, choice.results, refiners.get((choice.scoring, choice.offset))


def _base_only(split: EvalSplit) -> EvalSplit:
    """The same images scored on the base classes only (what the parent knows)."""
    keep = set(split.base_ids)
    gt = {**split.gt, "annotations": [a for a in split.gt.get("annotations", []) if a["category_id"] in keep],
          "categories": [c for c in split.gt.get("categories", []) if c["id"] in keep]}
    return EvalSplit(rows=split.rows, gt=gt, base_ids=list(split.base_ids), novel_ids=[])
