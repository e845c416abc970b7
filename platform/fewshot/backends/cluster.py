"""Where a job runs: the Ray cluster options every job shares, and connecting to the cluster.

:class:`ClusterOptions` is declared once; the workflows compose it into their options and
the jobs turn it into flags (``--ray-address``, ``--num-workers``, ``--cpus-per-worker``,
``--gpu``, ``--gpus-per-worker``, ``--precision``, ``--placement-strategy``, ``--storage-path``), with per-job defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import ray
import ray.data

from fewshot.model.devices import PRECISIONS, Precision, default_device, resolve_precision

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ClusterOptions:
    """Where the job runs."""

    ray_address: str | None = None
    """Ray cluster address (default: the job's cluster, else the one running on this machine,
    else a new local one)."""
    num_workers: int = 1
    """Ray Train workers (DDP processes)."""
    cpus_per_worker: int = 2
    """CPUs (torch threads) per worker."""
    gpu: bool = False
    """Train (and evaluate) on GPUs: each Ray Train worker, Tune trial or ablation task gets
    --gpus-per-worker GPUs and runs on ray.train.torch.get_device() / its CUDA device."""
    gpus_per_worker: float = 1.0
    """GPUs per worker / trial / task with --gpu; a fraction (e.g. 0.5) packs several on one GPU."""
    precision: Precision = "auto"
    """Numeric precision of training and evaluation: fp32, bf16 or fp16 (autocast; fp16 with a
    gradient scaler, GPU only). auto: bf16 on a GPU that supports it, fp32 on CPU. The version
    records it (tag 'precision') and is evaluated and served in it."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' placement group: PACK fills one node first (DDP traffic
    stays local); SPREAD puts them on different nodes where it can; STRICT_SPREAD one worker a
    node or not at all (waits for enough nodes)."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (default: a local temp dir; give shared storage, e.g.
    s3://bucket/prefix, on a multi-node cluster)."""

    def check(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(f"--num-workers and --cpus-per-worker must be at least 1, got "
                             f"{self.num_workers} and {self.cpus_per_worker}")
        if not self.gpus_per_worker > 0:
            raise ValueError(f"--gpus-per-worker must be > 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError(f"--gpus-per-worker above 1 must be a whole number, got {self.gpus_per_worker}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp16" and not self.gpu:
            raise ValueError("--precision fp16 needs --gpu (use bf16 or fp32 on CPU)")

    @property
    def gpus(self) -> float:
        """GPUs one worker / trial / task asks Ray for (0 without --gpu)."""
        return float(self.gpus_per_worker) if self.gpu else 0.0

    def device(self) -> "torch.device":
        """Where this process (driver-side evaluation) runs a model: a GPU with --gpu when this
        process sees one, else the CPU."""
        import torch

        return default_device() if self.gpu else torch.device("cpu")

    def eval_precision(self, device) -> str:
        """The concrete precision a model trained under these options is evaluated in."""
        return resolve_precision(self.precision, device)


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at ``address``, else the one this machine runs, else start one.

    ``RAY_ADDRESS`` set to a dashboard URL (``http://...``, what ``ray job submit`` wants) is
    not a cluster address; it is ignored here so that a plain ``python jobs/x.py`` still works.
    """
    if ray.is_initialized():
        return
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        os.environ.pop("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=True)
    # Job logs show the training bar; Ray Data's per-operator bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False


def _predict_task(checkpoint, split, precision: str) -> list[dict]:
    from fewshot.learning.episode import predict

    return predict(checkpoint, split, device=None, precision=precision)  # the task's GPU


def predict_on(cluster: ClusterOptions, checkpoint, split, precision: str = "fp32",
               trunk_cache=None) -> list[dict]:
    """COCO results of ``checkpoint`` on ``split`` where the job's models run: this process's
    GPU with --gpu when it has one, else a Ray task holding --gpus-per-worker GPUs (a driver
    on a CPU-only head node), else this CPU; in ``precision`` (the version's). ``trunk_cache``
    (:class:`fewshot.model.trunk_cache.TrunkCache`): shared by models of one trunk when they
    run in this process."""
    import torch

    from fewshot.learning.episode import predict

    if cluster.gpu and not torch.cuda.is_available():
        task = ray.remote(num_gpus=cluster.gpus, num_cpus=1)(_predict_task)
        return ray.get(task.remote(checkpoint, split, precision))
    device = cluster.device()
    return predict(checkpoint, split, device=device,
                   precision=precision if precision != "auto" else resolve_precision("auto", device),
                   trunk_cache=trunk_cache)
