"""Glue: teach the champion detector new classes from K shots each, then gate and register.

Order matters so that bad input loses nothing: every check (known classes, not already in
the served class set, enough annotated instances for K shots) runs before anything is
written. Then: load ``models:/NAME@champion``, imprint one classifier row per new class from
its support boxes, fine-tune on the K-shot novel set plus K replay exemplars of every existing
class with everything but the new rows frozen by default (Ray Train), evaluate parent and child on the test split
(pycocotools), register version N+1 with ``parent_version``, and move ``champion`` only if the
base classes' AP50 dropped by no more than ``max_base_drop``; otherwise the version gets
``candidate`` and the reason is printed and tagged.
"""
from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch

from catalog import IMAGE_SCHEMA, Catalog
from catalog.class_sets import ClassSet, ClassSetNotFound, extend, load_class_set, save_class_set
from catalog.kshot import InsufficientInstances, count_instances, sample_kshot
from fewshot import ray_train, registry, tracking
from fewshot.checkpoint import load_checkpoint, save_checkpoint
from fewshot.data import class_index, rows_to_batch
from fewshot.evaluation import default_eval_split, evaluate_checkpoint_on_split
from fewshot.expansion import expand_detector
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
    ray_address: str | None = None
    storage_path: str | None = None


@dataclass
class Plan:
    """What validation established; nothing has been written yet."""

    parent: registry.VersionInfo
    dataset: str
    new_classes: list[str]
    new_ids: list[int]
    old_ids: list[int]


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
    return Plan(parent=parent, dataset=dataset, new_classes=list(opts.classes),
                new_ids=new_ids, old_ids=old_ids)


def _support_rows(table: pa.Table, plan: Plan, opts: AddClassesOptions) -> tuple[list[dict], list[dict]]:
    novel = sample_kshot(table, plan.new_ids, opts.shots, opts.seed)
    replay: list[dict] = []
    if opts.replay:
        counts = count_instances(table, plan.old_ids)
        k = min([opts.shots] + [counts.get(i, 0) for i in plan.old_ids])
        if k > 0:
            try:
                replay = sample_kshot(table, plan.old_ids, k, opts.seed)
            except InsufficientInstances:
                replay = []
    return novel, replay


def run_add_classes(opts: AddClassesOptions) -> AddClassesResult:
    plan = validate(opts)
    catalog = Catalog(opts.catalog_root)
    manifest = catalog.manifest(plan.dataset)
    eval_split = opts.eval_split or default_eval_split(manifest)
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
    novel_rows, replay_rows = _support_rows(train_table, plan, opts)

    torch.manual_seed(opts.seed)
    model = parent_ckpt.build_model()
    index = class_index(child_ids)
    images, targets = rows_to_batch(novel_rows, index)
    replay_images, replay_targets = rows_to_batch(replay_rows, index)
    expand_detector(model, images, targets, num_new=len(plan.new_classes),
                    center_images=replay_images, center_targets=replay_targets)
    init_path = save_checkpoint(work / "init.pt", model, parent_ckpt.config, child_classes,
                                child_ids, plan.dataset, class_set.id, parent_ckpt.extra)

    ray_train.ensure_ray(opts.ray_address)
    run_name = f"add-{'+'.join(plan.new_classes)}-{opts.shots}shot-s{opts.seed}"
    with tracking.start_run(opts.mlflow_uri, opts.experiment, run_name,
                            tags={"job": "add_classes", "parent_version": str(plan.parent.version),
                                  "class_set": class_set.id}) as run:
        tracking.log_params({
            "dataset": plan.dataset, "new_classes": plan.new_classes, "shots": opts.shots,
            "seed": opts.seed, "parent_version": plan.parent.version, "freeze": opts.freeze,
            "replay": opts.replay, "novel_images": len(novel_rows), "replay_images": len(replay_rows),
            "max_base_drop": opts.max_base_drop, "balancer": opts.balancer or "none",
            **opts.train.to_dict(),
        })
        rows = novel_rows + replay_rows
        dataset = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
        spec = ray_train.TrainJobSpec(
            init_checkpoint=str(init_path), train=opts.train, freeze=opts.freeze, seed=opts.seed,
            balancer=opts.balancer, mlflow_tracking_uri=opts.mlflow_uri,
            mlflow_run_id=run.info.run_id, metric_prefix="finetune/",
        )
        print(f"fine-tuning on {len(novel_rows)} novel + {len(replay_rows)} replay images "
              f"({opts.shots} shots, freeze={opts.freeze}) ...", flush=True)
        final = ray_train.fit(spec, dataset, num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                              cpus_per_worker=opts.cpus_per_worker, storage_path=opts.storage_path,
                              name=f"add-{run.info.run_id[:8]}")

        print(f"evaluating parent and child on the {eval_split} split ...", flush=True)
        base_names = list(parent_ckpt.classes)
        parent_report = evaluate_checkpoint_on_split(parent_ckpt, catalog, plan.dataset, eval_split,
                                                     base_names, max_images=opts.max_eval_images)
        child_report = evaluate_checkpoint_on_split(load_checkpoint(final), catalog, plan.dataset,
                                                    eval_split, base_names, plan.new_classes,
                                                    max_images=opts.max_eval_images)
        tracking.log_eval_report(parent_report, prefix="parent_")
        tracking.log_eval_report(child_report, prefix="test_", novel=set(plan.new_classes),
                                 parent_per_class=parent_report.per_class_AP50)
        drop = parent_report.bAP50 - child_report.bAP50
        mlflow.log_metric("bAP50_change", -drop)
        promoted = drop <= opts.max_base_drop
        reason = (f"base AP50 {parent_report.bAP50:.4f} -> {child_report.bAP50:.4f} "
                  f"(change {-drop:+.4f}, allowed drop {opts.max_base_drop:.4f})")

        save_class_set(catalog, class_set)
        version = registry.register_detector(
            opts.mlflow_uri, opts.model_name, final, classes=child_classes, class_set=class_set.id,
            parent_version=plan.parent.version, shots=opts.shots,
            extra_tags={"dataset": plan.dataset, "job": "add_classes", "seed": str(opts.seed),
                        "new_classes": ",".join(plan.new_classes), "gate": "passed" if promoted else "failed",
                        "gate_reason": reason, "parent_bAP50": f"{parent_report.bAP50:.4f}",
                        "bAP50_change": f"{-drop:.4f}", **tracking.eval_tags(child_report)},
        )
        alias = registry.CHAMPION if promoted else registry.CANDIDATE
        registry.set_alias(opts.mlflow_uri, opts.model_name, alias, version.version)
        mlflow.set_tags({"registered_version": str(version.version), "alias": alias})

    print(f"child: nAP50={child_report.nAP50:.4f} bAP50={child_report.bAP50:.4f} "
          f"nAP={child_report.nAP:.4f} bAP={child_report.bAP:.4f}", flush=True)
    if promoted:
        print(f"registered {opts.model_name} version {version.version} as '{alias}' "
              f"(parent {plan.parent.version}): {reason}", flush=True)
    else:
        print(f"registered {opts.model_name} version {version.version} as '{alias}', NOT promoted: "
              f"{reason}; champion stays version {plan.parent.version}", flush=True)
    return AddClassesResult(version=version, promoted=promoted, reason=reason,
                            parent_bAP50=parent_report.bAP50, child=child_report.headline())
