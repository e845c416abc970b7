"""Option groups every job shares, each declared once: where things live, how a job is
evaluated, and the comma-separated class-list type of the command line.

The groups of the lower rooms are declared there and only composed here:
:class:`fewshot.backends.cluster.ClusterOptions` (where the job runs),
:class:`fewshot.learning.method.MethodOptions` (freeze, balancer, teacher, distillation,
refinement) and :class:`fewshot.learning.loop.TrainConfig` (steps, optimizer, schedule).
A workflow's options class holds one of each (with that job's defaults) and
:func:`fewshot.workflows.cli.parse` turns the whole tree into flags, with each field's
docstring as its ``--help`` text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from catalog import default_root
from fewshot.backends.registry import DEFAULT_MODEL_NAME


def split_names(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


# A tuple of names written on the command line (and in a config file) as "a,b,c".
NameList = Annotated[tuple[str, ...], tyro.constructors.PrimitiveConstructorSpec(
    nargs=1, metavar="A,B,...",
    instance_from_str=lambda args: split_names(args[0]),
    is_instance=lambda value: isinstance(value, tuple),
    str_from_instance=lambda value: [",".join(value)],
)]

# A group whose flags appear without the group's prefix (--num-workers, not --cluster.num-workers).
Flat = tyro.conf.OmitArgPrefixes


@dataclass(frozen=True)
class StoreOptions:
    """Where data, models and runs live."""

    catalog: str = field(default_factory=lambda: str(default_root()))
    """Catalog root: datasets and class sets ($FEWSHOT_CATALOG)."""
    mlflow_uri: str | None = field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI"))
    """MLflow tracking server and model registry ($MLFLOW_TRACKING_URI)."""
    model_name: str = DEFAULT_MODEL_NAME
    """Registered model: one per deployment; version N is a class set."""
    experiment: str = "fewshot"
    """MLflow experiment of this job's run."""

    def check(self) -> None:
        if not self.mlflow_uri:
            raise ValueError("no MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class EvalOptions:
    """How the job scores models (pycocotools COCOeval)."""

    eval_split: Literal["test", "val"] | None = None
    """Split the reported figures are computed on (default: test if the dataset has one, else val)."""
    max_eval_images: int | None = None
    """Score on at most this many images of that split (default: all)."""
