"""Precision-driven Gradient Balancer (PGB).

Ren, Li & Kong, "Adaptive Multi-task Learning for Few-Shot Object Detection", ECCV 2024
(MTL-FSOD, https://github.com/RY-Paper/MTL-FSOD). In few-shot fine-tuning the
classification and localization tasks drift apart in quality; PGB measures each task's
precision on the batch's foreground RoIs and hands the *poorer* task the larger share of
the backward gradient into the shared RoI feature:

    p_c = mean_i softmax(s_i)[y_i]                  (classification precision)
    p_l = mean_i IoU(decode(t_i), gt_i)             (localization precision)
    w_c* = 2 * p_l / (p_c + p_l),   w_l* = 2 * p_c / (p_c + p_l)

with p clamped to [eps, 1]. The factor 2 normalises ``w_c* + w_l* = 2`` so (1, 1), plain
Faster R-CNN, is the neutral point and the overall gradient scale matches the baseline.
The applied weights are an exponential moving average over batches,

    w_t = m * w_{t-1} + (1 - m) * w*_t,   w_0 = (1, 1),

which keeps ``w_c + w_l = 2`` at every step. The gradient into the shared feature is
``w_c * dL/dx_cls + w_l * dL/dx_reg`` (:func:`fewshot.balancers.task_split.split_for_tasks`); the
heads' own parameter gradients are untouched.

Timing: ``observe`` runs after the losses of batch t are computed; whether it is called
before or after ``loss.backward()`` decides if batch t's precisions already shape batch
t's gradient (before) or only from batch t+1 on (after). Both are valid; pick one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

from .task_precision import TaskPrecision
from .base import TaskBalancer, register_balancer

__all__ = ["PrecisionGradientBalancer", "pgb_target_weights"]


def pgb_target_weights(p_cls: float, p_loc: float, eps: float = 1e-3) -> tuple[float, float]:
    """Un-smoothed PGB weights ``(2 p_l / (p_c + p_l), 2 p_c / (p_c + p_l))``.

    Precisions are clamped to ``[eps, 1]`` first, so both weights lie in ``(0, 2)``.
    """
    p_c = min(max(float(p_cls), eps), 1.0)
    p_l = min(max(float(p_loc), eps), 1.0)
    total = p_c + p_l
    return 2.0 * p_l / total, 2.0 * p_c / total


@register_balancer
class PrecisionGradientBalancer(TaskBalancer):
    """PGB with EMA smoothing of the weights.

    Args:
        momentum: EMA momentum ``m`` in [0, 1); 0 applies each batch's weights directly.
        eps: lower clamp on the precisions (guards against a zero precision).
    """

    name = "pgb"

    def __init__(self, momentum: float = 0.9, eps: float = 1e-3) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 < float(eps) <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.w_cls = 1.0
        self.w_loc = 1.0
        self.num_observed = 0
        self.last_p_cls = float("nan")
        self.last_p_loc = float("nan")

    def observe(self, stats: TaskPrecision | None) -> None:
        """Move the weights toward this batch's target; empty/invalid stats are ignored."""
        if stats is None or not stats.valid:
            return
        t_c, t_l = pgb_target_weights(stats.p_cls, stats.p_loc, self.eps)
        m = self.momentum
        self.w_cls = m * self.w_cls + (1.0 - m) * t_c
        self.w_loc = m * self.w_loc + (1.0 - m) * t_l
        self.num_observed += 1
        self.last_p_cls = float(stats.p_cls)
        self.last_p_loc = float(stats.p_loc)

    def backward_weights(self, g_cls: Tensor, g_reg: Tensor) -> tuple[float, float]:
        return self.w_cls, self.w_loc

    def current_weights(self) -> tuple[float, float]:
        return self.w_cls, self.w_loc

    def diagnostics(self) -> dict[str, float]:
        out = {"pgb_w_cls": self.w_cls, "pgb_w_loc": self.w_loc}
        if math.isfinite(self.last_p_cls):
            out.update(pgb_p_cls=self.last_p_cls, pgb_p_loc=self.last_p_loc)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            momentum=self.momentum,
            eps=self.eps,
            w_cls=self.w_cls,
            w_loc=self.w_loc,
            num_observed=self.num_observed,
            last_p_cls=self.last_p_cls,
            last_p_loc=self.last_p_loc,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.momentum = float(state.get("momentum", self.momentum))
        self.eps = float(state.get("eps", self.eps))
        self.w_cls = float(state.get("w_cls", 1.0))
        self.w_loc = float(state.get("w_loc", 1.0))
        self.num_observed = int(state.get("num_observed", 0))
        self.last_p_cls = float(state.get("last_p_cls", float("nan")))
        self.last_p_loc = float(state.get("last_p_loc", float("nan")))
