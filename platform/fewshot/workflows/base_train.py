"""Train the base detector on the cluster and register it as the ``champion``.

validate → plan → run: :func:`validate` resolves the dataset, the base classes, the preset,
the teacher and the method before anything starts; :func:`run_base_training` reads the train
split as a Ray Data dataset, trains with Ray Train (DDP over ``num_workers``), fits CLIP
refinement on val when a teacher is given, scores on test (reported; val when the dataset has
no test split, and the version says so), registers the result with the class-set tags, moves
``champion`` through the promotion actor and only then writes the class set to the catalog.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from catalog import Catalog, DatasetManifest
from catalog.class_sets import ClassSet, save_class_set
from catalog.teacher_cache import build_teacher_cache, has_teacher_cache, join_teacher_embeddings
from fewshot.backends import promotion, ray_train, registry, tracking
from fewshot.backends.cluster import ClusterOptions, ensure_ray, predict_on
from fewshot.backends.ray_train import PRECISION_KEY
from fewshot.learning.episode import refine_checkpoint_file, score
from fewshot.learning.loop import TrainConfig
from fewshot.learning.method import MethodConfig, MethodOptions
from fewshot.metrics.coco_eval import load_eval_split
from fewshot.model.checkpoint import load_checkpoint, save_checkpoint
from fewshot.model.detector import build_detector
from fewshot.model.presets import PresetName, preset
from fewshot.workflows.options import Flat, NameList, StoreOptions


@dataclass(frozen=True)
class BaseTrainOptions:
    """Train the base detector with Ray Train (DDP), evaluate it with pycocotools, log to MLflow
    and register it as version N with alias 'champion'."""

    dataset: str = "synthworld"
    """Dataset name in the catalog."""
    class_split: str = "split1"
    """The dataset's base/novel split whose base classes to train on."""
    classes: NameList = ()
    """Comma-separated base classes (overrides --class-split; for imported datasets)."""
    preset: PresetName = "cpu-small"
    """Detector preset: cpu-small trains on CPU in minutes, r50-fpn is for GPUs."""
    seed: int = 0
    """Random seed."""
    augment: Literal["flip", "dihedral"] = "flip"
    """Training augmentation: flip (random horizontal flips) or dihedral (flips, right-angle
    rotations and photometric distortion, fewshot.model.augment; for data whose classes do not
    change when rotated or recoloured, like the embedded world: 0.719 against 0.690 base bAP50 at
    4x the demo's schedule, README)."""
    checkpoint_every: int = 200
    """Report a Ray Train checkpoint every N steps (0: only at the end)."""
    max_test_images: int | None = None
    """Report on at most this many test images (default: all)."""
    max_val_images: int | None = 150
    """Val images the refinement fusion weight is chosen on (None: all)."""
    config_file: str | None = None
    """A YAML file of these options (flag names, flat or grouped); flags given beside it win."""
    store: Annotated[StoreOptions, Flat] = field(default_factory=lambda: StoreOptions(experiment="fewshot-base"))
    cluster: Annotated[ClusterOptions, Flat] = field(
        default_factory=lambda: ClusterOptions(num_workers=2, cpus_per_worker=1))
    method: Annotated[MethodOptions, Flat] = field(
        default_factory=lambda: MethodOptions(freeze="none", parent_distill=None))
    train: Annotated[TrainConfig, Flat] = field(
        default_factory=lambda: TrainConfig(steps=700, batch_size=8, lr=1e-3, warmup_steps=50))


@dataclass
class Plan:
    opts: BaseTrainOptions
    manifest: DatasetManifest
    classes: list[str]
    category_ids: list[int]
    teacher: object | None
    method: MethodConfig


def validate(opts: BaseTrainOptions) -> Plan:
    """Every check before anything starts; raises ValueError with a clear message."""
    if opts.method.parent_distill:
        raise ValueError("--parent-distill holds a child to its parent's outputs; base training has no "
                         "parent (it starts from ImageNet or random weights): drop the flag")
    opts.store.check()
    opts.cluster.check()
    opts.method.check()
    catalog = Catalog(opts.store.catalog)
    manifest = catalog.manifest(opts.dataset)
    known = manifest.category_by_name()
    if opts.classes:
        unknown = [c for c in opts.classes if c not in known]
        if unknown:
            raise ValueError(f"unknown classes for dataset {opts.dataset!r}: {unknown}")
        if len(set(opts.classes)) != len(opts.classes):
            raise ValueError("--classes lists a class twice")
        classes = list(opts.classes)
    else:
        classes = list(manifest.class_split(opts.class_split).base)
    if not (manifest.splits.get("test") or manifest.splits.get("val")):
        raise ValueError(f"dataset {opts.dataset!r} has neither a test nor a val split to evaluate on")
    teacher = None
    if opts.method.teacher:
        from fewshot.clip.teacher import load_teacher

        teacher = load_teacher(opts.method.teacher)
    return Plan(opts=opts, manifest=manifest, classes=classes, category_ids=[known[c].id for c in classes],
                teacher=teacher, method=opts.method.config(teacher.embed_dim if teacher is not None else None))


def _train_dataset(catalog: Catalog, plan: Plan):
    """The train split as a Ray Data dataset (with each box's teacher embedding when distilling,
    cached with the dataset and built once)."""
    dataset, teacher = plan.manifest.name, plan.teacher
    if not plan.method.distills:
        return ray_train.dataset_from_parquet(catalog.split_source(dataset, "train"))
    if not has_teacher_cache(catalog, dataset, "train", teacher.id):
        print(f"caching {teacher.id} embeddings of every train box (once per dataset) ...", flush=True)
        build_teacher_cache(catalog, dataset, "train", teacher, progress=True)
    return ray_train.dataset_from_table(
        join_teacher_embeddings(catalog.read_split(dataset, "train"), catalog, dataset, "train", teacher.id))


def run_base_training(opts: BaseTrainOptions) -> registry.VersionInfo:
    plan = validate(opts)
    work = Path(tempfile.mkdtemp(prefix="fewshot-base-"))
    try:
        return _run(plan, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(plan: Plan, work: Path) -> registry.VersionInfo:
    opts, store = plan.opts, plan.opts.store
    catalog = Catalog(store.catalog)
    dataset, classes = plan.manifest.name, plan.classes
    class_set = ClassSet.create(dataset=dataset, classes=tuple(classes), parent=None)
    config = preset(opts.preset)
    torch.manual_seed(opts.seed)
    init_path = save_checkpoint(work / "init.pt", build_detector(config, len(classes) + 1), config,
                                classes, plan.category_ids, dataset, class_set.id)
    report_split = "test" if plan.manifest.splits.get("test") else "val"

    ensure_ray(opts.cluster.ray_address)
    with tracking.start_run(store.mlflow_uri, store.experiment, f"base-{dataset}",
                            tags={"job": "base_train", "class_set": class_set.id}) as run:
        tracking.log_params({
            "dataset": dataset, "class_split": opts.class_split, "classes": classes,
            "preset": opts.preset, "num_workers": opts.cluster.num_workers, "seed": opts.seed,
            "augment": opts.augment,
            "gpu": opts.cluster.gpu, "gpus_per_worker": opts.cluster.gpus, "precision_option": opts.cluster.precision,
            "teacher": plan.teacher.id if plan.teacher is not None else "none",
            **{k: ("none" if v is None else v) for k, v in plan.method.to_dict().items()},
            **config.to_dict(), **opts.train.to_dict(),
        })
        spec = ray_train.TrainJobSpec(
            init_checkpoint=str(init_path), train=opts.train, seed=opts.seed, method=plan.method,
            mlflow_tracking_uri=store.mlflow_uri, mlflow_run_id=run.info.run_id,
            checkpoint_every=opts.checkpoint_every, augment=opts.augment,
        )
        print(f"training base model on {plan.manifest.splits.get('train')} images, "
              f"{len(classes)} classes, {opts.cluster.num_workers} Ray Train workers ...", flush=True)
        final = ray_train.fit(spec, _train_dataset(catalog, plan), opts.cluster, out_dir=work / "final",
                              name=f"base-{dataset}-{run.info.run_id[:8]}")
        refine_tags = {}
        # the precision the workers trained in: the version is evaluated (and served) in it
        precision = load_checkpoint(final).extra.get(PRECISION_KEY, "fp32")
        if plan.teacher is not None and opts.method.refine and plan.manifest.splits.get("val"):
            val = load_eval_split(catalog, dataset, "val", classes, max_images=opts.max_val_images)
            refiner = refine_checkpoint_file(
                final, plan.teacher, val, predict_on(opts.cluster, load_checkpoint(final), val, precision))
            refine_tags = tracking.log_refinement(refiner)
        else:
            refiner = None
        print(f"evaluating on the {report_split} split ...", flush=True)
        model_ckpt = load_checkpoint(final)
        split = load_eval_split(catalog, dataset, report_split, classes,
                                max_images=opts.max_test_images if report_split == "test" else opts.max_val_images)
        results = predict_on(opts.cluster, model_ckpt, split, precision)
        report = score(model_ckpt, split, results=results)
        if refiner is not None:
            tracking.log_metrics({f"unrefined_{k}": v for k, v in report.headline().items()})
            report = score(model_ckpt, split, refiner=refiner, results=results)  # what Serve serves
        tracking.log_eval_report(report, prefix=f"{report_split}_")
        version = registry.register_detector(
            store.mlflow_uri, store.model_name, final, classes=classes, class_set=class_set.id,
            parent_version=None, shots=None,
            description=(f"Base model: {len(classes)} classes of {dataset} ({opts.preset}, "
                         f"{opts.train.steps} steps x {opts.cluster.num_workers} workers). Reported on "
                         f"{report.num_images} {report_split} images: bAP50 {report.bAP50:.3f}, bAP {report.bAP:.3f}."),
            extra_tags={"dataset": dataset, "job": "base_train", "seed": str(opts.seed),
                        "balancer": plan.method.balancer or "none",
                        "distill_beta": f"{plan.method.distill_beta:g}", "report_split": report_split,
                        promotion.INCOMPLETE_TAG: "true", PRECISION_KEY: precision, **refine_tags, **tracking.eval_tags(report)},
        )
        promotion.promote(store.mlflow_uri, store.model_name, version.version, expected_champion=None,
                          want_champion=True, reason="base training: a new base model is the champion")
        save_class_set(catalog, class_set)
        tracking.set_tags({"registered_version": str(version.version)})
    print(f"base model: bAP={report.bAP:.4f} bAP50={report.bAP50:.4f} on {report.num_images} "
          f"{report_split} images", flush=True)
    print(f"registered {store.model_name} version {version.version} (champion), "
          f"class set {class_set.id}", flush=True)
    return registry.get_version(store.mlflow_uri, store.model_name, version.version)
