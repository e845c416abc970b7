"""Task-gradient balancers for the shared RoI feature of the Fast R-CNN box head.

One method per module behind :class:`TaskBalancer` (LibMTL style):

* :class:`FixedBalancer` (``"fixed"``) - constant weights, the baseline;
* :class:`PrecisionGradientBalancer` (``"pgb"``) - MTL-FSOD's precision-driven gradient
  balancer (ECCV 2024);
* :class:`GradNormBalancer` (``"gradnorm"``) - inverse gradient-norm scaling
  (arXiv 2509.23915).

Build one with :func:`make_balancer` and apply it with
:func:`fewshot.balancers.task_split.split_for_tasks`.
"""

from .base import TaskBalancer, balancer_names, make_balancer, register_balancer
from .fixed import FixedBalancer
from .gradnorm import GradNormBalancer, inverse_norm_weights
from .pgb import PrecisionGradientBalancer, pgb_target_weights

__all__ = [
    "TaskBalancer",
    "make_balancer",
    "balancer_names",
    "register_balancer",
    "FixedBalancer",
    "PrecisionGradientBalancer",
    "GradNormBalancer",
    "pgb_target_weights",
    "inverse_norm_weights",
]
