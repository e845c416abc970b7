"""Constant task weights: the baseline every adaptive balancer is compared against.

The gradient reaching the shared RoI feature is ``w_cls * g_cls + w_loc * g_reg`` with
fixed ``w_cls``/``w_loc``; the default (1, 1) reproduces plain Faster R-CNN training.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

from .base import TaskBalancer, register_balancer

__all__ = ["FixedBalancer"]


@register_balancer
class FixedBalancer(TaskBalancer):
    """Constant weights ``(w_cls, w_loc)``; ``observe`` is ignored."""

    name = "fixed"

    def __init__(self, w_cls: float = 1.0, w_loc: float = 1.0) -> None:
        super().__init__()
        for label, w in (("w_cls", w_cls), ("w_loc", w_loc)):
            if not math.isfinite(float(w)) or float(w) < 0:
                raise ValueError(f"{label} must be a finite non-negative number, got {w!r}")
        self.w_cls = float(w_cls)
        self.w_loc = float(w_loc)
        self._last_applied = (self.w_cls, self.w_loc)

    def backward_weights(self, g_cls: Tensor, g_reg: Tensor) -> tuple[float, float]:
        return self.w_cls, self.w_loc

    def current_weights(self) -> tuple[float, float]:
        return self.w_cls, self.w_loc

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(w_cls=self.w_cls, w_loc=self.w_loc)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.w_cls = float(state.get("w_cls", self.w_cls))
        self.w_loc = float(state.get("w_loc", self.w_loc))
