"""Glue: run ``fewshot.learning.loop.train`` on a Ray Train ``TorchTrainer`` (DDP over N workers).

Each worker reads its shard of a Ray Data dataset (catalog Parquet rows whose images Ray Data
decodes in its own tasks, ``map_batches(decode_column_batch)``, so no step waits on decoding)
and runs the same explicit loop as a plain process would, on ``ray.train.torch.get_device()``
(a GPU with ``--gpu``; batches pinned and copied ``non_blocking``) at the run's precision. Rank 0 logs losses (and the weights
a balancer applied) to the MLflow run whose id it is given, shows a progress bar in the job
log, and reports checkpoints through Ray Train every ``checkpoint_every`` steps so a worker
failure resumes from the last one (``max_failures``; the restarted workers print "resumed at
step N" and rank 0 logs ``<prefix>resumed_at_step``). The final checkpoint is a
``fewshot.model.checkpoint`` file (``detector.pt``) inside the Ray Train checkpoint directory.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import os

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from fewshot.backends.cluster import ClusterOptions
from fewshot.model.checkpoint import load_checkpoint, save_checkpoint
from fewshot.model.augment import RECIPES, augment_sample
from fewshot.model.batches import class_index, columnar_to_rows, decode_column_batch, prefetch, rows_to_batch
from fewshot.model.devices import grad_scaler, pin_batch, resolve_precision
from fewshot.model.checkpoint import DISTILL_HEAD_ATTR as HEAD_ATTR
from fewshot.learning.method import MethodConfig, balancer_metrics, prepare_for_training
from fewshot.model.trunk_cache import TrunkCache, cached_trunk, use_trunk_cache
from fewshot.learning.loop import TrainConfig, make_optimizer, train

CHECKPOINT_FILE = "detector.pt"
PRECISION_KEY = "precision"  # in the checkpoint's extra: fp32 / bf16 / fp16
STATE_FILE = "train_state.pt"


@dataclass
class TrainJobSpec:
    """Everything a worker needs; plain data so it ships to the workers as the loop config."""

    init_checkpoint: object  # detector.pt to start from (a fresh base model or an expanded
    # parent): the driver's file, shipped to the workers as bytes through the object store
    # (fit does it), because workers on other nodes cannot read the driver's disk
    train: TrainConfig
    method: MethodConfig = MethodConfig(freeze="none")
    seed: int = 0
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    metric_prefix: str = "train/"
    checkpoint_every: int = 0  # 0: only at the end
    threads_per_worker: int = 1
    progress: bool = True
    precision: str = "auto"  # fewshot.model.devices.resolve_precision on the worker's device
    augment: str = "flip"  # flip, or a recipe of fewshot.model.augment.RECIPES applied per image


def _infinite_batches(spec: TrainJobSpec, index: dict[int, int], rank: int) -> Iterator:
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng(spec.seed * 1000 + rank)
    transform = None if spec.augment == "flip" else RECIPES[spec.augment]()  # torch's RNG, seeded per rank
    while True:
        produced = 0
        for cols in shard.iter_batches(
            batch_size=spec.train.batch_size, batch_format="numpy", drop_last=False,
            local_shuffle_buffer_size=max(64, 4 * spec.train.batch_size),
            local_shuffle_seed=int(rng.integers(1 << 31)),
        ):
            produced += 1
            if transform is None:
                yield rows_to_batch(columnar_to_rows(cols), index, rng=rng, uint8=True)
            else:
                images, targets = rows_to_batch(columnar_to_rows(cols), index, uint8=True)
                yield tuple(map(list, zip(*(augment_sample(transform, i, t) for i, t in zip(images, targets)))))
        if produced == 0:
            raise RuntimeError(f"worker {rank} received an empty dataset shard")


def _mlflow_logger(spec: TrainJobSpec):
    """Rank 0 logs step metrics straight to the driver's MLflow run."""
    if not (spec.mlflow_tracking_uri and spec.mlflow_run_id):
        return None
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.mlflow_tracking_uri)

    def log(step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        client.log_batch(spec.mlflow_run_id, metrics=[
            Metric(spec.metric_prefix + k, float(v), now, step) for k, v in metrics.items()
        ])

    return log


def train_loop_per_worker(config: dict) -> None:
    spec: TrainJobSpec = config["spec"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, spec.threads_per_worker))
    torch.manual_seed(spec.seed + rank)
    ray.data.DataContext.get_current().enable_progress_bars = False
    device = ray.train.torch.get_device()  # this worker's GPU with --gpu, else the CPU
    precision = resolve_precision(spec.precision, device)

    start = load_checkpoint(ray.get(spec.init_checkpoint) if isinstance(spec.init_checkpoint, ray.ObjectRef)
                            else spec.init_checkpoint)
    model = start.build_model()
    balancer = prepare_for_training(model, spec.method)
    distill_head = getattr(model.roi_heads, HEAD_ATTR, None)
    model.to(device)  # before the optimizer state is loaded: it follows its parameters' device

    optimizer = make_optimizer(model, spec.train)
    scaler = grad_scaler(device, precision)
    start_step = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            model.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE).state_dict)
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            start_step = int(state["step"])
            if balancer is not None and state.get("balancer"):
                balancer.load_state_dict(state["balancer"])
            if distill_head is not None and state.get("distill_head"):
                distill_head.load_state_dict(state["distill_head"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])

    ddp_model = ray.train.torch.prepare_model(
        model, move_to_device=device, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    index = class_index(start.category_ids)
    batches = _infinite_batches(spec, index, rank)
    if device.type == "cuda":  # assemble and pin the next batches while the GPU runs this one
        batches = prefetch(batches, depth=2, fn=lambda b: pin_batch(*b))
    log_mlflow = _mlflow_logger(spec) if rank == 0 else None
    if resume is not None:
        # a restarted worker group (a worker or its node died): say where it picked up, in the
        # job log and, from rank 0, as a metric whose timestamp says when training went on
        print(f"resumed at step {start_step} from checkpoint {resume.path} (rank {rank})", flush=True)
        if log_mlflow is not None:
            log_mlflow(start_step, {"resumed_at_step": start_step})

    def save_and_report(step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "step": step}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            # the precision it trained in travels with the weights: evaluation and Serve use it
            save_checkpoint(Path(d) / CHECKPOINT_FILE, model, start.config, start.classes,
                            start.category_ids, start.dataset, start.class_set,
                            {**start.extra, PRECISION_KEY: precision})
            torch.save({"optimizer": optimizer.state_dict(), "step": step,
                        "balancer": balancer.state_dict() if balancer is not None else None,
                        # the detector file drops the distillation head; resuming needs it
                        "distill_head": distill_head.state_dict() if distill_head is not None else None,
                        "scaler": scaler.state_dict() if scaler is not None else None},
                       Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if log_mlflow is not None:
            log_mlflow(step, metrics)
        if spec.checkpoint_every and step % spec.checkpoint_every == 0 and step < spec.train.steps:
            save_and_report(step, metrics)

    # a few-shot fine-tune with a frozen trunk sees each support image many times: compute its
    # features and proposals once (fewshot.model.trunk_cache; the saved checkpoints are plain)
    # (never under augmentation: the same image comes back transformed)
    cache = TrunkCache() if use_trunk_cache(spec.method.freeze, device) and spec.augment == "flip" else None
    with cached_trunk(model, cache):
        last = train(ddp_model, batches, spec.train, on_log=on_log, extra_metrics=balancer_metrics(balancer),
                     progress=spec.progress and rank == 0, start_step=start_step, optimizer=optimizer,
                     device=device, precision=precision, scaler=scaler)
    save_and_report(spec.train.steps, last)


def scaling_config(cluster: ClusterOptions) -> ScalingConfig:
    """Workers of ``cluster.cpus_per_worker`` CPUs and, with ``--gpu``, ``gpus_per_worker``
    GPUs each (a fraction packs several workers on one GPU)."""
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.gpu:
        resources["GPU"] = cluster.gpus_per_worker
    return ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.gpu,
                         resources_per_worker=resources, placement_strategy=cluster.placement_strategy)


def decode_tasks_cpus(cluster: ClusterOptions) -> float:
    """CPUs each decode task asks for: 1 when the cluster has CPUs beyond the workers', else 0
    (a zero-CPU task always schedules; it shares the cores with the workers)."""
    try:
        total = float(ray.cluster_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - not connected: be safe
        return 0.0
    return 1.0 if total - cluster.num_workers * cluster.cpus_per_worker >= 1.0 else 0.0


def dataset_from_rows(rows: list[dict], schema: pa.Schema) -> "ray.data.Dataset":
    """A Ray Data dataset of catalog rows built in this process (a K-shot support set)."""
    return ray.data.from_arrow(pa.Table.from_pylist(rows, schema=schema))


def dataset_from_table(table: pa.Table) -> "ray.data.Dataset":
    return ray.data.from_arrow(table)


def dataset_from_parquet(source) -> "ray.data.Dataset":
    """A split's Parquet read by the cluster: a :class:`catalog.ParquetSource` (a path or URI
    every node can reach, and its filesystem)."""
    return ray.data.read_parquet(source.uri, filesystem=source.filesystem)


def storage_for(cluster: ClusterOptions) -> tuple[str, object | None]:
    """Where Ray Train/Tune keep checkpoints: ``--storage-path`` or ``$FEWSHOT_RAY_STORAGE``
    (a local path, or a URI such as ``s3://bucket/ray-results`` that every node reaches), else a
    local temp dir (one node only). Returns ``(path, pyarrow filesystem or None)``."""
    target = cluster.storage_path or os.environ.get("FEWSHOT_RAY_STORAGE")
    if not target:
        return str(Path(tempfile.gettempdir()) / "fewshot-ray-results"), None
    if "://" not in str(target):
        return str(target), None
    from catalog.storage import resolve_uri

    fs, path = resolve_uri(target)
    return path, fs


def fit(
    spec: TrainJobSpec,
    dataset: "ray.data.Dataset",
    cluster: ClusterOptions,
    *,
    out_dir: str | Path,
    name: str = "fewshot-train",
    max_failures: int = 1,
) -> Path:
    """Train on the cluster; returns ``out_dir/detector.pt``, the final checkpoint.

    The dataset is read (materialized) before the workers start: on a small cluster the workers
    hold every CPU, and a lazily read dataset would wait forever for a CPU to run its read
    tasks. Image decoding then streams as Ray Data ``map_batches`` tasks beside the workers
    (:func:`decode_tasks_cpus` CPUs each: none reserved when the workers hold every CPU, so
    they can always run), in order, so a seeded run sees the same batches.
    """
    spec.threads_per_worker = cluster.cpus_per_worker
    if not isinstance(spec.init_checkpoint, ray.ObjectRef):
        spec.init_checkpoint = ray.put(Path(spec.init_checkpoint).read_bytes())
    storage_path, storage_fs = storage_for(cluster)
    spec.precision = cluster.precision
    dataset = dataset.materialize().map_batches(
        decode_column_batch, batch_size=max(1, spec.train.batch_size), batch_format="numpy",
        num_cpus=decode_tasks_cpus(cluster), zero_copy_batch=True)
    options = ray.data.ExecutionOptions()
    options.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=scaling_config(cluster),
        dataset_config=ray.train.DataConfig(execution_options=options),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        target = out_dir / CHECKPOINT_FILE
        target.write_bytes((Path(d) / CHECKPOINT_FILE).read_bytes())
    return target
