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
import ray
import ray.data
import torch

from catalog import Catalog
from catalog.class_sets import ClassSet, save_class_set
from fewshot import ray_train, registry, tracking
from fewshot.checkpoint import load_checkpoint, save_checkpoint
from fewshot.config import preset
from fewshot.detector import build_detector
from fewshot.evaluation import default_eval_split, evaluate_checkpoint_on_split
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


def run_base_training(opts: BaseTrainOptions) -> registry.VersionInfo:
    catalog = Catalog(opts.catalog_root)
    manifest = catalog.manifest(opts.dataset)
    classes = resolve_base_classes(catalog, opts)
    by_name = manifest.category_by_name()
    category_ids = [by_name[c].id for c in classes]
    class_set = ClassSet.create(dataset=opts.dataset, classes=tuple(classes), parent=None)
    config = preset(opts.preset)
    eval_split = opts.eval_split or default_eval_split(manifest)

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
            "balancer": opts.balancer or "none", **config.to_dict(), **opts.train.to_dict(),
        })
        spec = ray_train.TrainJobSpec(
            init_checkpoint=str(init_path), train=opts.train, freeze="none", seed=opts.seed,
            balancer=opts.balancer, mlflow_tracking_uri=opts.mlflow_uri,
            mlflow_run_id=run.info.run_id, checkpoint_every=opts.checkpoint_every,
        )
        dataset = ray.data.read_parquet(str(catalog.split_path(opts.dataset, "train")))
        print(f"training base model on {manifest.splits.get('train')} images, "
              f"{len(classes)} classes, {opts.num_workers} Ray Train workers ...", flush=True)
        final = ray_train.fit(spec, dataset, num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                              cpus_per_worker=opts.cpus_per_worker, storage_path=opts.storage_path,
                              name=f"base-{opts.dataset}-{run.info.run_id[:8]}")
        print(f"evaluating on the {eval_split} split ...", flush=True)
        report = evaluate_checkpoint_on_split(load_checkpoint(final), catalog, opts.dataset,
                                              eval_split, classes,
                                              max_images=opts.max_eval_images)
        tracking.log_eval_report(report, prefix="test_")
        save_class_set(catalog, class_set)
        version = registry.register_detector(
            opts.mlflow_uri, opts.model_name, final, classes=classes, class_set=class_set.id,
            parent_version=None, shots=None,
            extra_tags={"dataset": opts.dataset, "job": "base_train", "seed": str(opts.seed),
                        **tracking.eval_tags(report)},
        )
        registry.set_alias(opts.mlflow_uri, opts.model_name, registry.CHAMPION, version.version)
        mlflow.set_tag("registered_version", str(version.version))
    print(f"base model: bAP={report.bAP:.4f} bAP50={report.bAP50:.4f} on {report.num_images} "
          f"{eval_split} images", flush=True)
    print(f"registered {opts.model_name} version {version.version} (champion), "
          f"class set {class_set.id}", flush=True)
    return version
