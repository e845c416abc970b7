"""The task-balancer interface and its factory.

A balancer decides how much of each task's gradient flows back into the shared RoI
feature where the Fast R-CNN box head splits into its classification and box-regression
branches (see :func:`fewshot.balancers.task_split.split_for_tasks`). Following LibMTL's layout, each
method lives in its own file behind this one small interface and reports the weights it
applied so the training loop can log them.

Life cycle inside one training step::

    x_cls, x_reg = split_for_tasks(x, balancer)    # forward: identity
    ...losses...; loss.backward()                  # backward: balancer.backward_weights(g_cls, g_reg)
    balancer.observe(task_precision_of_batch)      # optional per-batch statistics (PGB)
    log(balancer.last_weights)                     # {"w_cls": ..., "w_loc": ...}

All state is plain Python floats, so ``state_dict()`` is cheap to checkpoint and to
compare across data-parallel ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

from torch import Tensor

from .task_precision import TaskPrecision
from .task_split import split_for_tasks

__all__ = ["TaskBalancer", "register_balancer", "make_balancer", "balancer_names"]


class TaskBalancer(ABC):
    """Base class of the two-task (classification / localization) gradient balancers.

    Subclasses implement :meth:`backward_weights` and, if they keep statistics,
    :meth:`observe`, :meth:`state_dict` and :meth:`load_state_dict`.

    Attributes:
        name: short identifier of the method (``"fixed"``, ``"pgb"``, ``"gradnorm"``).
        enabled: when False, :func:`split_for_tasks` is a no-op and gradients are unscaled.
    """

    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        self.enabled: bool = True
        self._last_applied: tuple[float, float] = (1.0, 1.0)

    # -- the two hooks --------------------------------------------------------------
    @abstractmethod
    def backward_weights(self, g_cls: Tensor, g_reg: Tensor) -> tuple[float, float]:
        """Return ``(w_cls, w_loc)`` for this backward pass.

        ``g_cls`` / ``g_reg`` are the gradients of the total loss w.r.t. the classification
        and regression copies of the shared feature (same shape as the feature). Called
        once per backward through :func:`split_for_tasks`; may update internal state.
        """

    def observe(self, stats: TaskPrecision | None) -> None:  # noqa: B027 - optional hook
        """Feed one batch's task precisions. Default: ignored."""

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_cls, x_reg)`` for the two heads, with this balancer's backward weights (see
        :func:`fewshot.balancers.task_split.split_for_tasks`). The box predictor calls it, so
        the model never imports a balancer."""
        return split_for_tasks(x, self)

    # -- reporting ------------------------------------------------------------------
    def current_weights(self) -> tuple[float, float]:
        """Weights the balancer would apply now, without any gradient information.

        Default: the weights applied at the last backward.
        """
        return self._last_applied

    def record_applied(self, w_cls: float, w_loc: float) -> None:
        """Remember the weights actually applied (called by ``split_for_tasks``)."""
        self._last_applied = (float(w_cls), float(w_loc))

    @property
    def last_weights(self) -> dict[str, float]:
        """``{"w_cls": ..., "w_loc": ...}`` applied at the last backward (for logging)."""
        w_c, w_l = self._last_applied
        return {"w_cls": w_c, "w_loc": w_l}

    def diagnostics(self) -> dict[str, float]:
        """Extra method-specific scalars worth logging (smoothed statistics). Default: none."""
        return {}

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Smoothed state as plain Python values."""
        return {"name": self.name, "enabled": self.enabled, "last_applied": list(self._last_applied)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; refuses a state saved by another method."""
        saved = state.get("name", self.name)
        if saved != self.name:
            raise ValueError(f"state_dict is for balancer {saved!r}, not {self.name!r}")
        self.enabled = bool(state.get("enabled", True))
        w_c, w_l = state.get("last_applied", (1.0, 1.0))
        self._last_applied = (float(w_c), float(w_l))

    def __repr__(self) -> str:
        w = self.last_weights
        return f"{type(self).__name__}(w_cls={w['w_cls']:.4g}, w_loc={w['w_loc']:.4g}, enabled={self.enabled})"


# The one list of balancer names: each method registers itself with @register_balancer
# (fewshot.balancers imports every method module, so the list is complete after any import
# of the package; this module imports none of them).
_REGISTRY: dict[str, type[TaskBalancer]] = {}


def register_balancer(cls: type[TaskBalancer]) -> type[TaskBalancer]:
    """Class decorator: make ``cls`` buildable by its ``name`` through :func:`make_balancer`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"balancer name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def balancer_names() -> tuple[str, ...]:
    """The names :func:`make_balancer` accepts, in registration order."""
    return tuple(_REGISTRY)


def make_balancer(name: str, **kwargs: Any) -> TaskBalancer:
    """Build a registered balancer by name (``"fixed"``, ``"pgb"``, ``"gradnorm"``, ...).

    ``kwargs`` go to the constructor (e.g. ``momentum=0.9``). Names are case-insensitive;
    ``"none"`` is an alias of ``"fixed"`` with its default (1, 1) weights.
    """
    key = str(name).strip().lower()
    if key == "none":
        key = "fixed"
    if key not in _REGISTRY:
        raise ValueError(f"unknown balancer {name!r}; choose one of {list(_REGISTRY)}")
    return _REGISTRY[key](**kwargs)
