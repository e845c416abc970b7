"""Identity-forward, scaled-backward split of the shared RoI feature into two task branches.

The box predictor of the detector feeds one shared RoI feature ``x`` (``[R, D]``, the
output of torchvision's ``TwoMLPHead``) to a classification head and a box-regression
head. :func:`split_for_tasks` returns two copies of ``x``; in the backward pass the
gradients arriving from the two branches are recombined as

    dL/dx = w_cls * dL/dx_cls + w_loc * dL/dx_reg

with ``(w_cls, w_loc) = balancer.backward_weights(dL/dx_cls, dL/dx_reg)``. This is how
MTL-FSOD's precision-driven gradient balancer (Ren et al., ECCV 2024) is applied, and,
with inverse gradient-norm weights, the gradient-norm loss scaling of arXiv 2509.23915.
The forward values are unchanged, and so are the gradients of the heads' own parameters;
only what flows further back into the shared layers is rebalanced.

Usage inside a predictor::

    x_cls, x_reg = split_for_tasks(x, balancer)
    scores, deltas = cls_head(x_cls), reg_head(x_reg)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # the interface imports this module, not the other way round
    from .base import TaskBalancer

__all__ = ["split_for_tasks", "balancer_active"]


class _TaskSplit(torch.autograd.Function):
    """``x -> (x, x)`` forward; ``(g_cls, g_reg) -> w_cls g_cls + w_loc g_reg`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, balancer: TaskBalancer) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.balancer = balancer
        # Two fresh tensors (not views of x) so either branch may modify its input in place.
        return x.clone(), x.clone()

    @staticmethod
    def backward(ctx: Any, g_cls: Tensor, g_reg: Tensor) -> tuple[Optional[Tensor], None]:  # type: ignore[override]
        balancer: TaskBalancer = ctx.balancer
        w_cls, w_loc = balancer.backward_weights(g_cls, g_reg)
        w_cls, w_loc = float(w_cls), float(w_loc)
        balancer.record_applied(w_cls, w_loc)
        return g_cls * w_cls + g_reg * w_loc, None


def balancer_active(x: Tensor, balancer: Optional[TaskBalancer]) -> bool:
    """Whether :func:`split_for_tasks` would insert the balancing function for ``x``."""
    return (
        balancer is not None
        and getattr(balancer, "enabled", True)
        and torch.is_grad_enabled()
        and x.requires_grad
    )


def split_for_tasks(x: Tensor, balancer: Optional[TaskBalancer]) -> tuple[Tensor, Tensor]:
    """Split the shared feature ``x`` into ``(x_cls, x_reg)`` for the two heads.

    Forward: both outputs equal ``x``. Backward: the gradient reaching ``x`` is
    ``w_cls * g_cls + w_loc * g_reg`` with the weights from
    ``balancer.backward_weights(g_cls, g_reg)``; those weights are stored on the balancer
    (``balancer.last_weights``) for logging.

    A no-op returning ``(x, x)`` when ``balancer`` is None or disabled
    (``balancer.enabled = False``), under ``torch.no_grad()`` / inference mode, or when
    ``x`` does not require grad (e.g. a frozen trunk at evaluation).
    """
    if not balancer_active(x, balancer):
        return x, x
    assert balancer is not None
    return _TaskSplit.apply(x, balancer)
