"""Gradient-norm loss scaling on the shared representation.

Multi-task loss scaling by inverse gradient norm (arXiv 2509.23915, which links MTL
optimisation imbalance to the disparity of per-task gradient norms and rescales each
task's loss by its gradient norm). Here the shared representation is the RoI feature
``x`` where the box head splits; each task's gradient on it, ``g_t = dL_t/dx``, has norm
``n_t = ||g_t||_2``. With an EMA of the norms (``N_t``), the weights are

    N_t <- m * N_t + (1 - m) * n_t          (N_t = n_t at the first step)
    w_t = 2 * (1 / N_t) / sum_j (1 / N_j)   (so w_cls + w_loc = 2)

i.e. for two tasks ``w_cls = 2 N_loc / (N_cls + N_loc)``: the task with the smaller
gradient is amplified, and (without smoothing) ``w_cls * n_cls == w_loc * n_loc`` so
neither task dominates the shared feature. Because the loss weight of a task scales its
gradient on ``x`` linearly, scaling the gradient on ``x`` equals scaling that task's loss
as far as every parameter upstream of ``x`` is concerned; the heads' own gradients are
untouched.

A step on which either norm is below ``eps`` or not finite (e.g. a batch without
foreground RoIs gives a zero regression gradient) leaves the statistics alone and applies
the previous weights ((1, 1) before any valid step).

Under data parallelism each rank sees its own gradients on its own RoIs, so weights can
differ slightly between ranks; the parameter gradients are still averaged by DDP.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .base import TaskBalancer, register_balancer

__all__ = ["GradNormBalancer", "inverse_norm_weights"]


def inverse_norm_weights(n_cls: float, n_loc: float) -> tuple[float, float]:
    """``w_t = 2 (1/n_t) / (1/n_cls + 1/n_loc)`` for positive norms."""
    inv_c, inv_l = 1.0 / n_cls, 1.0 / n_loc
    total = inv_c + inv_l
    return 2.0 * inv_c / total, 2.0 * inv_l / total


def _l2(g: Tensor | None) -> float:
    if g is None:
        return 0.0
    return float(torch.linalg.vector_norm(g.detach().float()))


@register_balancer
class GradNormBalancer(TaskBalancer):
    """Inverse-gradient-norm weights with optional EMA smoothing of the norms.

    Args:
        momentum: EMA momentum of the norms in [0, 1); 0 means no smoothing.
        smooth: set False to disable smoothing regardless of ``momentum``.
        eps: norms below this are treated as "no gradient" (weights kept).
    """

    name = "gradnorm"

    def __init__(self, momentum: float = 0.9, smooth: bool = True, eps: float = 1e-12) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.momentum = float(momentum)
        self.smooth = bool(smooth)
        self.eps = float(eps)
        self.norm_cls: float | None = None  # EMA of ||dL/dx_cls||
        self.norm_loc: float | None = None  # EMA of ||dL/dx_reg||
        self.w_cls = 1.0
        self.w_loc = 1.0
        self.num_updates = 0
        self.num_skipped = 0

    def backward_weights(self, g_cls: Tensor, g_reg: Tensor) -> tuple[float, float]:
        n_c, n_l = _l2(g_cls), _l2(g_reg)
        if not (math.isfinite(n_c) and math.isfinite(n_l)) or n_c < self.eps or n_l < self.eps:
            self.num_skipped += 1
            return self.w_cls, self.w_loc
        m = self.momentum if self.smooth else 0.0
        if self.norm_cls is None or self.norm_loc is None:
            self.norm_cls, self.norm_loc = n_c, n_l
        else:
            self.norm_cls = m * self.norm_cls + (1.0 - m) * n_c
            self.norm_loc = m * self.norm_loc + (1.0 - m) * n_l
        self.w_cls, self.w_loc = inverse_norm_weights(self.norm_cls, self.norm_loc)
        self.num_updates += 1
        return self.w_cls, self.w_loc

    def current_weights(self) -> tuple[float, float]:
        return self.w_cls, self.w_loc

    def diagnostics(self) -> dict[str, float]:
        if self.norm_cls is None or self.norm_loc is None:
            return {}
        return {"gradnorm_n_cls": self.norm_cls, "gradnorm_n_loc": self.norm_loc}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            momentum=self.momentum,
            smooth=self.smooth,
            eps=self.eps,
            norm_cls=self.norm_cls,
            norm_loc=self.norm_loc,
            w_cls=self.w_cls,
            w_loc=self.w_loc,
            num_updates=self.num_updates,
            num_skipped=self.num_skipped,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.momentum = float(state.get("momentum", self.momentum))
        self.smooth = bool(state.get("smooth", self.smooth))
        self.eps = float(state.get("eps", self.eps))
        n_c, n_l = state.get("norm_cls"), state.get("norm_loc")
        self.norm_cls = None if n_c is None else float(n_c)
        self.norm_loc = None if n_l is None else float(n_l)
        self.w_cls = float(state.get("w_cls", 1.0))
        self.w_loc = float(state.get("w_loc", 1.0))
        self.num_updates = int(state.get("num_updates", 0))
        self.num_skipped = int(state.get("num_skipped", 0))
