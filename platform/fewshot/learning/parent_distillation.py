"""Distillation of the old classes' outputs from the parent: the child may not forget what it
is told to keep.

Shmelkov, Schmid and Alahari, "Incremental Learning of Object Detectors without Catastrophic
Forgetting", ICCV 2017, Sec. 3.2, Eq. (1): while the new network B learns new classes, its
outputs for the old classes on the same regions are held to the old network A's,

    L_dist(y_A, t_A, y_B, t_B) = 1 / (N |C_A|) * sum_i [ sum_c (ybar_A - ybar_B)^2 + sum_c (t_A - t_B)^2 ]

with ``ybar`` the classification logits of the old classes (background included) after
subtracting their mean over those classes, ``t`` the old classes' box regression outputs, and
the sum over N regions. Here:

* A is the expanded parent as fine-tuning starts (its box head, its old classifier rows, its
  box regressor), copied once and frozen; B is the model being trained.
* The regions are the RoIs the second stage samples for its own loss in that step (foreground
  and background, torchvision's sampler), and A reads **the same RoI-aligned features** B's box
  head reads (``RoIBatch.pooled``). Under ``--freeze backbone`` and ``rpn-head`` those are
  exactly the parent's features (the backbone is frozen), so this is Eq. (1) on B's sampled
  regions (under ``rpn-head`` drawn from the proposals of B's own, training RPN). Under
  ``--freeze none`` they are the child's (its backbone trains too), so only the drift of the box
  head and the regressor is held, not the backbone's: running A's backbone as well would double
  the cost of every step. Measured on BCCD that costs the new class and keeps nothing, so
  add_classes applies it only where the backbone is frozen (``--freeze backbone``, ``rpn-head``;
  :data:`PARENT_DISTILL_POLICIES`).
* Shmelkov et al. sample 64 of the 128 proposals A finds least like background instead, which
  a pseudo-labelled support set (:mod:`fewshot.learning.pseudo_labels`) makes less needed: its
  old objects are foreground RoIs already.
* The box regressor is class-agnostic (:mod:`fewshot.model.cosine_head`), so ``t`` is one set of
  four deltas per region; the two terms are averaged over their own widths, so the regression
  term is not outweighed 16:4 by the logits (15 old classes and background).

Why it is needed (README *The ablation*): under ``--freeze backbone`` the box head and the
regressor train on a few dozen support images; with no new class in the classifier at all (the
new rows' logits at -100), the child's old-class AP50 was already 4.6 points below the parent's
68.6 on the 4x dihedral base (one pseudo-labelled 5-shot draw, 150 test images), so most of the
old classes' loss came from the shared feature drifting, not from the new rows competing for
them; with lambda = 1 that loss was 1.8 points, with lambda = 5 0.5. On 10 paired draws per
shot count, on top of the pseudo-labels, it raised the new classes' AP50 by 1.6 to 2.4 points at
the ablation's schedule (lr 1e-4, 100 steps); at add_classes' (lr 5e-4, 150 steps) it raised the
old classes' by 1.3 to 4.0 and left the new classes' within noise at 5 and 10 shots.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.model.detector import RoIBatch

DEFAULT_PARENT_DISTILL = 1.0   # lambda, chosen on val at the ablation's schedule (README *The learning methods*)
# The freezing policies under which add_classes (and Tune) apply it: those where the box head
# trains on the parent's own features (the backbone frozen). Not ``none``: there the
# backbone trains too, so A reads the child's drifting features and can only hold the box head
# to the parent's answers on them; on BCCD (README *Real images: BCCD*, K = 5 / 10, 5 paired
# draws, with pseudo-labels) it cost the new class -12.1 +/- 16.0 / -13.2 +/- 12.8 AP50 and
# kept no base AP50 (-0.2 +/- 2.2 / -1.5 +/- 2.2).
PARENT_DISTILL_POLICIES = ("backbone", "rpn-head")


class ParentDistillationLoss:
    """The ``roi_heads.extra_losses`` callable :func:`attach_parent_distillation` installs; adds
    ``loss_parent_distill`` (``weight`` times Eq. (1) of the module docstring) to the loss dict
    and merges a previously installed ``extra_losses``.

    The parent's frozen copies live here, not as submodules of the model: they are never trained,
    saved in a checkpoint or wrapped by DDP; they follow the RoI features to their device."""

    def __init__(self, roi_heads: nn.Module, weight: float,
                 previous: Callable[[RoIBatch], dict] | None = None):
        if not weight > 0:
            raise ValueError(f"parent distillation weight must be > 0, got {weight}")
        predictor = roi_heads.box_predictor
        self.num_old = int(predictor.cls_score.weight_old.shape[0])
        self.box_head = _frozen_copy(roi_heads.box_head)
        self.cls_score = _frozen_copy(predictor.cls_score)
        self.bbox_pred = _frozen_copy(predictor.bbox_pred)
        self.weight = float(weight)
        self.previous = previous

    def parent_outputs(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parent's old-class logits ``[R, num_old]`` and box deltas ``[R, 4]`` on RoI-aligned
        features (no gradient)."""
        if next(self.box_head.parameters()).device != pooled.device:
            for module in (self.box_head, self.cls_score, self.bbox_pred):
                module.to(pooled.device)
        with torch.no_grad():
            features = self.box_head(pooled)
            return self.cls_score(features)[:, :self.num_old].float(), self.bbox_pred(features).float()

    def __call__(self, batch: RoIBatch) -> dict[str, torch.Tensor]:
        out = dict(self.previous(batch)) if self.previous is not None else {}
        if batch.pooled is None:
            raise ValueError("parent distillation needs the RoI-aligned features (RoIBatch.pooled)")
        parent_logits, parent_deltas = self.parent_outputs(batch.pooled)
        child_logits = batch.class_logits[:, :self.num_old].float()
        child_deltas = batch.box_regression[:, :4].float()
        out["loss_parent_distill"] = self.weight * parent_distillation_loss(
            child_logits, child_deltas, parent_logits, parent_deltas)
        return out


def parent_distillation_loss(child_logits: torch.Tensor, child_deltas: torch.Tensor,
                             parent_logits: torch.Tensor, parent_deltas: torch.Tensor) -> torch.Tensor:
    """Eq. (1) of Shmelkov et al. over R regions: the mean squared difference of the
    mean-subtracted old-class logits ``[R, C_old]`` plus that of the box deltas ``[R, 4]``."""
    if child_logits.shape != parent_logits.shape or child_deltas.shape != parent_deltas.shape:
        raise ValueError(f"child and parent outputs differ in shape: {tuple(child_logits.shape)} vs "
                         f"{tuple(parent_logits.shape)}, {tuple(child_deltas.shape)} vs {tuple(parent_deltas.shape)}")
    if child_logits.shape[0] == 0:
        return child_logits.sum() * 0.0
    centred_child = child_logits - child_logits.mean(dim=1, keepdim=True)
    centred_parent = parent_logits - parent_logits.mean(dim=1, keepdim=True)
    return F.mse_loss(centred_child, centred_parent) + F.mse_loss(child_deltas, parent_deltas)


def attach_parent_distillation(model: nn.Module, weight: float) -> nn.Module:
    """Hold ``model``'s old-class outputs to their values now (call it on the expanded parent,
    before training): ``model.roi_heads.extra_losses`` adds ``loss_parent_distill``. Returns
    the model."""
    roi_heads = model.roi_heads
    if not hasattr(roi_heads, "extra_losses"):
        raise TypeError("model.roi_heads has no extra_losses hook (build it with build_detector)")
    previous = roi_heads.extra_losses
    if isinstance(previous, ParentDistillationLoss):   # re-attaching replaces, never stacks
        previous = previous.previous
    roi_heads.extra_losses = ParentDistillationLoss(roi_heads, weight, previous)
    return model


def _frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    clone.eval()
    return clone
