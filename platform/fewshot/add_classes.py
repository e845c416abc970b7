"""Glue: teach the champion detector new classes from K shots each, then gate and register.

Order matters so that bad input loses nothing: every check (known classes, not already in
the served class set, enough annotated instances for K shots) runs before anything is
written. Then: load ``models:/NAME@champion``, imprint one classifier row per new class from
its support boxes, fine-tune on the K-shot novel set plus K replay exemplars of every existing
class with everything but the new rows frozen by default (Ray Train), evaluate parent and child on the test split
(pycocotools), register version N+1 with ``parent_version``, and move ``champion`` only if the
base classes' AP50 dropped by no more than ``max_base_drop``; otherwise the version gets
``candidate`` and the reason is printed and tagged.

The learning method comes from the options (``fewshot.method.MethodConfig``): a task balancer,
CLIP distillation (the teacher embeds the support boxes, which travel with the rows to the
workers), and, with a teacher, CLIP refinement fitted on the val split and stored in the
child's checkpoint, so the evaluation and the gate judge what Serve will serve. ``config``
("best" or a JSON file) overrides them with what ``jobs/tune.py`` found.
"""
from __future__ import annotations

import difflib
import json
import tempfile
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

import mlflow
import pyarrow as pa
import ray
import ray.data

from catalog import IMAGE_SCHEMA, Catalog
from catalog.class_sets import ClassSet, ClassSetNotFound, extend, load_class_set, save_class_set
from catalog.kshot import count_instances, sample_support
from fewshot import ray_train, registry, tracking
from fewshot.checkpoint import load_checkpoint, save_checkpoint
from fewshot.data import TEACHER_EMB_KEY
from fewshot.episode import Episode, expand_parent, predict, refine_checkpoint_file, score
from fewshot.evaluation import default_eval_split, load_eval_split
from fewshot.method import MethodConfig, TeacherEmbedder
from fewshot.refinement import EXTRA_KEY as REFINER_KEY
from fewshot.training import TrainConfig


class AddClassesError(ValueError):
    """Bad input to add_classes; nothing was written."""


@dataclass
class AddClassesOptions:
    catalog_root: str
    mlflow_uri: str
    classes: list[str]
    shots: int = 5
    seed: int = 0
    dataset: str | None = None  # default: the champion's dataset
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=150, batch_size=8, lr=5e-4, warmup_steps=20, log_every=10))
    freeze: str = "head"
    replay: bool = True
    max_base_drop: float = 0.05
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False
    model_name: str = registry.DEFAULT_MODEL_NAME
    experiment: str = "fewshot-add-classes"
    eval_split: str | None = None  # None: "test" if the dataset has it, else "val"
    max_eval_images: int | None = None
    balancer: str | None = None
    balancer_momentum: float = 0.9
    teacher: str | None = None     # CLIP teacher spec (fewshot.teacher.load_teacher)
    distill_beta: float = 0.0      # > 0: distil the teacher into the RoI features (needs teacher)
    refine: bool = True            # with a teacher: fit CLIP refinement on val and store it
    max_val_images: int | None = 150  # images of the val split the fusion weight is chosen on
    config: str | None = None      # "best" (what jobs/tune.py stored) or a JSON file
    ray_address: str | None = None
    storage_path: str | None = None

    def method(self, teacher_dim: int | None) -> MethodConfig:
        return MethodConfig(freeze=self.freeze, balancer=self.balancer,
                            balancer_momentum=self.balancer_momentum,
                            distill_beta=self.distill_beta, teacher_dim=teacher_dim)


@dataclass
class Plan:
    """What validation established; nothing has been written yet."""

    parent: registry.VersionInfo
    dataset: str
    new_classes: list[str]
    new_ids: list[int]
    old_ids: list[int]
    teacher: object | None = None  # the loaded CLIP teacher (--teacher)


@dataclass
class AddClassesResult:
    version: registry.VersionInfo
    promoted: bool
    reason: str
    parent_bAP50: float
    child: dict


def validate(opts: AddClassesOptions) -> Plan:
    """Every input check, before any write. Raises AddClassesError with a clear message."""
    if opts.shots < 1:
        raise AddClassesError(f"--shots must be at least 1, got {opts.shots}")
    if opts.distill_beta < 0:
        raise AddClassesError(f"--distill-beta must be >= 0, got {opts.distill_beta}")
    if opts.distill_beta > 0 and not opts.teacher:
        raise AddClassesError("--distill-beta > 0 needs a CLIP teacher: pass --teacher")
    if not opts.classes:
        raise AddClassesError("--classes is empty: name at least one class to add")
    dupes = sorted({c for c in opts.classes if opts.classes.count(c) > 1})
    if dupes:
        raise AddClassesError(f"--classes names {dupes} more than once")
    parent = registry.get_alias(opts.mlflow_uri, opts.model_name, registry.CHAMPION)
    if parent is None:
        raise AddClassesError(
            f"registered model {opts.model_name!r} has no '{registry.CHAMPION}' version at "
            f"{opts.mlflow_uri}: run jobs/base_train.py first")
    dataset = opts.dataset or parent.tags.get("dataset")
    if not dataset:
        raise AddClassesError("the champion version has no 'dataset' tag: pass --dataset")
    catalog = Catalog(opts.catalog_root)
    try:
        manifest = catalog.manifest(dataset)
    except KeyError as err:
        raise AddClassesError(str(err.args[0] if err.args else err)) from None
    by_name = manifest.category_by_name()
    unknown = [c for c in opts.classes if c not in by_name]
    if unknown:
        hints = {c: difflib.get_close_matches(c, list(by_name), n=3) for c in unknown}
        hint = "; ".join(f"{c!r}: did you mean {h}?" for c, h in hints.items() if h)
        raise AddClassesError(
            f"unknown class(es) {unknown} for dataset {dataset!r}"
            + (f" ({hint})" if hint else f" (known: {sorted(by_name)})"))
    present = [c for c in opts.classes if c in parent.classes]
    if present:
        raise AddClassesError(
            f"class(es) {present} are already in the champion class set "
            f"(version {parent.version}, class set {parent.class_set})")
    new_ids = [by_name[c].id for c in opts.classes]
    table = catalog.read_split(dataset, "train", columns=["image_id", "category_ids", "iscrowd"])
    counts = count_instances(table, new_ids)
    short = {c: counts.get(by_name[c].id, 0) for c in opts.classes if counts.get(by_name[c].id, 0) < opts.shots}
    if short:
        raise AddClassesError(
            f"too few annotated instances in {dataset!r}/train for {opts.shots} shots: "
            + ", ".join(f"{c} has {n}" for c, n in short.items()))
    old_ids = [by_name[c].id for c in parent.classes]
    teacher = None
    if opts.teacher:
        from fewshot.teacher import load_teacher

        try:
            teacher = load_teacher(opts.teacher)
        except (OSError, ValueError, RuntimeError) as err:
            raise AddClassesError(f"--teacher {opts.teacher!r} could not be loaded: {err}") from None
    return Plan(parent=parent, dataset=dataset, new_classes=list(opts.classes),
                new_ids=new_ids, old_ids=old_ids, teacher=teacher)


def apply_config(opts: AddClassesOptions) -> tuple[AddClassesOptions, str]:
    """``opts`` with the tuned values of ``opts.config`` applied; ``(opts, source)``.

    A config stored by ``jobs/tune.py`` (``--config best``) also brings the freezing policy
    its trials trained with (the balancer and beta act only where the box head trains)."""
    if not opts.config:
        return opts, "flags"
    from fewshot.tuned_configs import load_best_record, load_config, train_config

    try:
        cfg, source = load_config(opts.config, opts.mlflow_uri, opts.model_name)
        freeze = opts.freeze
        if opts.config.strip() == "best":
            freeze = load_best_record(opts.mlflow_uri, opts.model_name).get("tuned_for", {}).get("freeze", freeze)
    except ValueError as err:
        raise AddClassesError(f"--config {opts.config}: {err}") from None
    new = dc_replace(
        opts, train=train_config(cfg, opts.train), freeze=freeze,
        balancer=cfg.get("balancer", opts.balancer) or None,
        balancer_momentum=float(cfg.get("balancer_momentum", opts.balancer_momentum)),
        distill_beta=float(cfg.get("distill_beta", opts.distill_beta)),
    )
    if new.distill_beta > 0 and not new.teacher:
        raise AddClassesError(f"--config {opts.config} distils (beta {new.distill_beta:g}): pass --teacher")
    return new, source


def run_add_classes(opts: AddClassesOptions) -> AddClassesResult:
    opts, config_source = apply_config(opts)
    plan = validate(opts)
    catalog = Catalog(opts.catalog_root)
    manifest = catalog.manifest(plan.dataset)
    eval_split = opts.eval_split or default_eval_split(manifest)
    refine = bool(opts.refine and plan.teacher is not None and manifest.splits.get("val"))
    work = Path(tempfile.mkdtemp(prefix="fewshot-add-"))
    parent_path = registry.download_checkpoint(opts.mlflow_uri, opts.model_name, plan.parent.version, work / "parent")
    parent_ckpt = load_checkpoint(parent_path)
    if parent_ckpt.classes != plan.parent.classes:
        raise RuntimeError("registry tags and checkpoint disagree on the class list")

    child_classes = parent_ckpt.classes + plan.new_classes
    child_ids = parent_ckpt.category_ids + plan.new_ids
    try:
        parent_cs = load_class_set(catalog, parent_ckpt.class_set)
    except ClassSetNotFound:  # a parent registered from another catalog
        parent_cs = ClassSet.create(plan.dataset, parent_ckpt.classes)
    class_set = extend(parent_cs, plan.new_classes)

    train_table = catalog.read_split(plan.dataset, "train")
    novel_rows, replay_rows = sample_support(train_table, plan.new_ids, plan.old_ids, opts.shots,
                                             opts.seed, replay=opts.replay)

    episode = Episode(parent=parent_ckpt, dataset=plan.dataset, new_classes=plan.new_classes,
                      new_ids=plan.new_ids, shots=opts.shots, seed=opts.seed,
                      novel_rows=novel_rows, replay_rows=replay_rows)
    start = expand_parent(episode)  # one imprinted classifier row per new class
    # the parent's refiner knew the old classes only: the child gets its own (or none)
    extra = {k: v for k, v in parent_ckpt.extra.items() if k != REFINER_KEY}
    init_path = save_checkpoint(work / "init.pt", start.build_model(), start.config, child_classes,
                                child_ids, plan.dataset, class_set.id, extra)
    method = opts.method(plan.teacher.embed_dim if plan.teacher is not None else None)

    ray_train.ensure_ray(opts.ray_address)
    run_name = f"add-{'+'.join(plan.new_classes)}-{opts.shots}shot-s{opts.seed}"
    with tracking.start_run(opts.mlflow_uri, opts.experiment, run_name,
                            tags={"job": "add_classes", "parent_version": str(plan.parent.version),
                                  "class_set": class_set.id}) as run:
        tracking.log_params({
            "dataset": plan.dataset, "new_classes": plan.new_classes, "shots": opts.shots,
            "seed": opts.seed, "parent_version": plan.parent.version,
            "replay": opts.replay, "novel_images": len(novel_rows), "replay_images": len(replay_rows),
            "max_base_drop": opts.max_base_drop, "balancer": opts.balancer or "none",
            "teacher": plan.teacher.id if plan.teacher is not None else "none",
            "refine": refine, "config_source": config_source,
            **{k: v for k, v in method.to_dict().items() if k != "balancer"},
            **opts.train.to_dict(),
        })
        rows = novel_rows + replay_rows
        schema = IMAGE_SCHEMA
        if method.distills:
            print(f"embedding {sum(len(r['boxes']) for r in rows)} support boxes with the teacher ...",
                  flush=True)
            rows = TeacherEmbedder(plan.teacher)(rows)
            schema = schema.append(pa.field(TEACHER_EMB_KEY, pa.list_(pa.list_(pa.float32()))))
        dataset = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=schema))
        spec = ray_train.TrainJobSpec(
            init_checkpoint=str(init_path), train=opts.train, seed=opts.seed, method=method,
            mlflow_tracking_uri=opts.mlflow_uri,
            mlflow_run_id=run.info.run_id, metric_prefix="finetune/",
        )
        print(f"fine-tuning on {len(novel_rows)} novel + {len(replay_rows)} replay images "
              f"({opts.shots} shots, freeze={opts.freeze}, balancer={opts.balancer or 'none'}, "
              f"distill beta={opts.distill_beta}) ...", flush=True)
        final = ray_train.fit(spec, dataset, num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                              cpus_per_worker=opts.cpus_per_worker, storage_path=opts.storage_path,
                              name=f"add-{run.info.run_id[:8]}")
        refiner = refine_checkpoint_file(final, plan.teacher, catalog, plan.dataset, list(parent_ckpt.classes),
                                         plan.new_classes, opts.max_val_images) if refine else None
        refine_tags = tracking.log_refinement(refiner) if refiner is not None else {}

        print(f"evaluating parent and child on the {eval_split} split ...", flush=True)
        base_names = list(parent_ckpt.classes)
        split = load_eval_split(catalog, plan.dataset, eval_split, base_names, plan.new_classes,
                                max_images=opts.max_eval_images)
        parent_split = load_eval_split(catalog, plan.dataset, eval_split, base_names,
                                       max_images=opts.max_eval_images)
        parent_report = score(parent_ckpt, parent_split)
        child_ckpt = load_checkpoint(final)
        child_results = predict(child_ckpt, split)
        child_report = score(child_ckpt, split, refiner=refiner, results=child_results)
        tracking.log_eval_report(parent_report, prefix="parent_")
        tracking.log_eval_report(child_report, prefix="test_", novel=set(plan.new_classes),
                                 parent_per_class=parent_report.per_class_AP50)
        if refiner is not None:  # the same model, scores not fused: what refinement adds
            raw = score(child_ckpt, split, results=child_results)
            mlflow.log_metrics({f"unrefined_{k}": v for k, v in raw.headline().items()})
        drop = parent_report.bAP50 - child_report.bAP50
        mlflow.log_metric("bAP50_change", -drop)
        promoted = drop <= opts.max_base_drop
        reason = (f"base AP50 {parent_report.bAP50:.4f} -> {child_report.bAP50:.4f} "
                  f"(change {-drop:+.4f}, allowed drop {opts.max_base_drop:.4f})")

        save_class_set(catalog, class_set)
        method_tags = {"balancer": opts.balancer or "none", "distill_beta": f"{opts.distill_beta:g}",
                       "freeze": opts.freeze, "config_source": config_source,
                       "config": json.dumps({**method.to_dict(), "lr": opts.train.lr,
                                             "steps": opts.train.steps}, sort_keys=True)}
        method_tags.update(refine_tags)
        version = registry.register_detector(
            opts.mlflow_uri, opts.model_name, final, classes=child_classes, class_set=class_set.id,
            parent_version=plan.parent.version, shots=opts.shots,
            extra_tags={"dataset": plan.dataset, "job": "add_classes", "seed": str(opts.seed),
                        "new_classes": ",".join(plan.new_classes), "gate": "passed" if promoted else "failed",
                        "gate_reason": reason, "parent_bAP50": f"{parent_report.bAP50:.4f}",
                        "bAP50_change": f"{-drop:.4f}", **method_tags, **tracking.eval_tags(child_report)},
        )
        alias = registry.CHAMPION if promoted else registry.CANDIDATE
        registry.set_alias(opts.mlflow_uri, opts.model_name, alias, version.version)
        mlflow.set_tags({"registered_version": str(version.version), "alias": alias})

    print(f"child: nAP50={child_report.nAP50:.4f} bAP50={child_report.bAP50:.4f} "
          f"nAP={child_report.nAP:.4f} bAP={child_report.bAP:.4f}"
          + (f" (CLIP refinement, fusion weight {refiner.fusion_weight:g})" if refiner else ""), flush=True)
    if promoted:
        print(f"registered {opts.model_name} version {version.version} as '{alias}' "
              f"(parent {plan.parent.version}): {reason}", flush=True)
    else:
        print(f"registered {opts.model_name} version {version.version} as '{alias}', NOT promoted: "
              f"{reason}; champion stays version {plan.parent.version}", flush=True)
    return AddClassesResult(version=version, promoted=promoted, reason=reason,
                            parent_bAP50=parent_report.bAP50, child=child_report.headline())
