"""Wire a task balancer into the detector: precision observations from each training batch.

The balancer's gradient scaling itself happens in ``CosineBoxPredictor`` (``split_for_tasks``);
this module feeds the precision-driven balancer (MTL-FSOD, ECCV 2024) the per-batch
classification and localisation precisions of the foreground RoIs, read where the RoI heads
have the sampled RoIs, their labels and regression targets.
"""
from __future__ import annotations

from torch import nn

from fewshot.model.detector import RoIBatch
from fewshot.balancers.task_precision import compute_task_precision


def attach_precision_observer(model: nn.Module, balancer) -> None:
    def observe(batch: RoIBatch) -> None:
        balancer.observe(compute_task_precision(
            batch.class_logits.detach(), batch.box_regression.detach(), batch.labels,
            batch.regression_targets, batch.proposals, model.roi_heads.box_coder))

    model.roi_heads.observers.append(observe)
