"""Glue: train the base detector on the cluster and register it as version 1 (``champion``).

Reads the catalog's train split as a Ray Data dataset, trains with Ray Train (DDP over
``num_workers``), evaluates on the test split with pycocotools, logs everything to one MLflow
run and registers the result with the class-set tags; the new version becomes ``champion``.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pyarrow as pa
import ray
import ray.data
import torch

from catalog import Catalog
from catalog.class_sets import ClassSet, save_class_set
from fewshot import ray_train, registry, tracking
from catalog.teacher_cache import build_teacher_cache, has_teacher_cache, join_teacher_embeddings
from fewshot.checkpoint import load_checkpoint, save_checkpoint
from fewshot.config import preset
from fewshot.detector import build_detector
from fewshot.episode import predict, refine_checkpoint_file, score
from fewshot.evaluation import default_eval_split, load_eval_split
from fewshot.method import MethodConfig
from fewshot.training import TrainConfig


@dataclass
class BaseTrainOptions:
    catalog_root: str
    dataset: str
    mlflow_uri: str
    base_classes: list[str] = field(default_factory=list)  # empty: the class split's base set
    class_split: str = "split1"
    preset: str = "cpu-small"
    train: TrainConfig = field(default_factory=TrainConfig)
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    seed: int = 0
    model_name: str = registry.DEFAULT_MODEL_NAME
    experiment: str = "fewshot-base"
    eval_split: str | None = None  # None: "test" if the dataset has it, else "val"
    max_eval_images: int | None = None
    balancer: str | None = None
    balancer_momentum: float = 0.9
    teacher: str | None = None     # CLIP teacher spec: distillation (beta > 0) and refinement
    distill_beta: float = 0.0
    refine: bool = True            # with a teacher: fit CLIP refinement on val and store it
    max_val_images: int | None = 150
    checkpoint_every: int = 0
    ray_address: str | None = None
    storage_path: str | None = None


def resolve_base_classes(catalog: Catalog, opts: BaseTrainOptions) -> list[str]:
    manifest = catalog.manifest(opts.dataset)
    if opts.base_classes:
        known = manifest.category_by_name()
        unknown = [c for c in opts.base_classes if c not in known]
        if unknown:
            raise ValueError(f"unknown classes for dataset {opts.dataset!r}: {unknown}")
        if len(set(opts.base_classes)) != len(opts.base_classes):
            raise ValueError("--classes lists a class twice")
        return list(opts.base_classes)
    return list(manifest.class_split(opts.class_split).base)


def _rows_with_teacher_embeddings(catalog: Catalog, dataset: str, teacher) -> pa.Table:
    """The train split with each box's teacher embedding (cached with the dataset, built once)."""
    if not has_teacher_cache(catalog, dataset, "train", teacher.id):
        print(f"caching {teacher.id} embeddings of every train box (once per dataset) ...", flush=True)
        build_teacher_cache(catalog, dataset, "train", teacher, progress=True)
    return join_teacher_embeddings(catalog.read_split(dataset, "train"), catalog, dataset, "train",
                                   teacher.id)


def run_base_training(opts: BaseTrainOptions) -> registry.VersionInfo:
    catalog = Catalog(opts.catalog_root)
    manifest = catalog.manifest(opts.dataset)
    classes = resolve_base_classes(catalog, opts)
    by_name = manifest.category_by_name()
    category_ids = [by_name[c].id for c in classes]
    class_set = ClassSet.create(dataset=opts.dataset, classes=tuple(classes), parent=None)
    config = preset(opts.preset)
    eval_split = opts.eval_split or default_eval_split(manifest)

    if opts.distill_beta > 0 and not opts.teacher:
        raise ValueError("distillation (beta > 0) needs a CLIP teacher: pass --teacher")
    teacher = None
    if opts.teacher:
        from fewshot.teacher import load_teacher

        teacher = load_teacher(opts.teacher)
    method = MethodConfig(freeze="none", balancer=opts.balancer, balancer_momentum=opts.balancer_momentum,
                          distill_beta=opts.distill_beta,
                          teacher_dim=teacher.embed_dim if teacher is not None else None)

    torch.manual_seed(opts.seed)
    work = Path(tempfile.mkdtemp(prefix="fewshot-base-"))
    init_path = save_checkpoint(work / "init.pt", build_detector(config, len(classes) + 1), config,
                                classes, category_ids, opts.dataset, class_set.id)

    ray_train.ensure_ray(opts.ray_address)
    with tracking.start_run(opts.mlflow_uri, opts.experiment, f"base-{opts.dataset}",
                            tags={"job": "base_train", "class_set": class_set.id}) as run:
        tracking.log_params({
            "dataset": opts.dataset, "class_split": opts.class_split, "classes": classes,
            "preset": opts.preset, "num_workers": opts.num_workers, "seed": opts.seed,
            "teacher": teacher.id if teacher is not None else "none",
            **method.to_dict(), **config.to_dict(), **opts.train.to_dict(),
        })
        spec = ray_train.TrainJobSpec(
            init_checkpoint=str(init_path), train=opts.train, seed=opts.seed,
            method=method,
            mlflow_tracking_uri=opts.mlflow_uri,
            mlflow_run_id=run.info.run_id, checkpoint_every=opts.checkpoint_every,
        )
        if method.distills:
            dataset = ray.data.from_arrow(_rows_with_teacher_embeddings(catalog, opts.dataset, teacher))
        else:
            dataset = ray.data.read_parquet(str(catalog.split_path(opts.dataset, "train")))
        print(f"training base model on {manifest.splits.get('train')} images, "
              f"{len(classes)} classes, {opts.num_workers} Ray Train workers ...", flush=True)
        final = ray_train.fit(spec, dataset, num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                              cpus_per_worker=opts.cpus_per_worker, storage_path=opts.storage_path,
                              name=f"base-{opts.dataset}-{run.info.run_id[:8]}")
        print(f"evaluating on the {eval_split} split ...", flush=True)
        model_ckpt = load_checkpoint(final)
        split = load_eval_split(catalog, opts.dataset, eval_split, classes, max_images=opts.max_eval_images)
        results = predict(model_ckpt, split)
        report = score(model_ckpt, split, results=results)
        refine_tags = {}
        if teacher is not None and opts.refine and manifest.splits.get("val"):
            refiner = refine_checkpoint_file(final, teacher, catalog, opts.dataset, classes,
                                             max_images=opts.max_val_images)
            mlflow.log_metrics({f"unrefined_{k}": v for k, v in report.headline().items()})
            report = score(model_ckpt, split, refiner=refiner, results=results)  # what Serve serves
            refine_tags = tracking.log_refinement(refiner)
        tracking.log_eval_report(report, prefix="test_")
        save_class_set(catalog, class_set)
        version = registry.register_detector(
            opts.mlflow_uri, opts.model_name, final, classes=classes, class_set=class_set.id,
            parent_version=None, shots=None,
            extra_tags={"dataset": opts.dataset, "job": "base_train", "seed": str(opts.seed),
                        "balancer": opts.balancer or "none", "distill_beta": f"{opts.distill_beta:g}",
                        **refine_tags, **tracking.eval_tags(report)},
        )
        registry.set_alias(opts.mlflow_uri, opts.model_name, registry.CHAMPION, version.version)
        mlflow.set_tag("registered_version", str(version.version))
    print(f"base model: bAP={report.bAP:.4f} bAP50={report.bAP50:.4f} on {report.num_images} "
          f"{eval_split} images", flush=True)
    print(f"registered {opts.model_name} version {version.version} (champion), "
          f"class set {class_set.id}", flush=True)
    return version
