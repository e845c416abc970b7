"""Which parameters train in each phase.

Policies (``--freeze``):
- ``none``: everything trains (base training from scratch).
- ``backbone``: backbone and RPN frozen; the RoI box head, the new classifier rows and the
  class-agnostic box regressor train.
- ``rpn``: the region proposal network and the new classifier rows train; backbone, box head,
  box regressor and old rows stay fixed. For new classes the base RPN learnt to call
  background (base training treats unlabelled objects as background, so a base RPN may
  propose few of them; on BCCD it proposes 10% of the Platelets at IoU 0.5,
  ``benchmarks/bccd_platelets.py``): ``head`` cannot reach them, ``none`` can but moves the
  features the old classes rely on.
- ``rpn-head``: everything but the backbone trains: the RPN (so new classes get proposals, as
  under ``rpn``) and the box head, box regressor and new rows (as under ``backbone``). The
  features the old classes are pooled from stay fixed, so parent distillation reads the
  parent's features exactly and holds the old classes' outputs on the proposals the child's RPN
  now makes.
- ``head``: only the new classifier rows train (TFA's "last layer only" setting, Wang et al.
  2020). The default for few-shot fine-tuning: every feature the old classes rely on stays
  fixed. Measured on the embedded world (split1, 10 shots, 150 steps, 150 test images):
  ``head`` kept base AP50 at 0.111 (parent 0.14) with novel AP50 0.149, while ``backbone``
  dropped base AP50 to 0.067 with novel AP50 near 0.

The classifier's old rows are frozen by construction in every policy (``weight_old``), and so
are the retained heads (:mod:`fewshot.model.retained_heads`), which answer the old classes as
the parent did only while the backbone and RPN stay as they were (``backbone``, ``head``).
"""
from __future__ import annotations

from torch import nn

POLICIES = ("none", "backbone", "rpn", "rpn-head", "head")
BOX_HEAD_TRAINS = ("backbone", "rpn-head", "none")   # the policies under which the RoI box head (the shared feature) trains


def apply_freezing(model: nn.Module, policy: str) -> dict[str, int]:
    """Set requires_grad by policy; returns counts of trainable and frozen parameters."""
    if policy not in POLICIES:
        raise ValueError(f"unknown freezing policy {policy!r}; choose one of {POLICIES}")
    predictor = model.roi_heads.box_predictor
    for p in model.parameters():
        p.requires_grad_(policy == "none")
    if policy != "none":
        predictor.cls_score.weight_new.requires_grad_(True)
    if policy in ("rpn", "rpn-head"):
        for p in model.rpn.parameters():
            p.requires_grad_(True)
    if policy in ("backbone", "rpn-head"):
        for p in model.roi_heads.box_head.parameters():
            p.requires_grad_(True)
        for p in predictor.bbox_pred.parameters():
            p.requires_grad_(True)
    predictor.cls_score.weight_old.requires_grad_(False)
    for p in model.roi_heads.retained.parameters():
        p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable_params": trainable, "frozen_params": frozen}
