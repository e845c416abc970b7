"""Where a job runs: the Ray cluster options every job shares, and connecting to the cluster.

:class:`ClusterOptions` is declared once; the workflows compose it into their options and
the jobs turn it into flags (``--ray-address``, ``--num-workers``, ``--cpus-per-worker``,
``--gpu``, ``--placement-strategy``, ``--storage-path``), with per-job defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import ray
import ray.data


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
    """One GPU per worker (on a GPU cluster)."""
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
