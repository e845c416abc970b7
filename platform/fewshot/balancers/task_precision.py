"""Per-batch task precisions of the Fast R-CNN box head (pure torch, no side effects).

These feed the Precision-driven Gradient Balancer (PGB) of MTL-FSOD
(Ren, Li & Kong, "Adaptive Multi-task Learning for Few-Shot Object Detection", ECCV 2024):

* classification precision ``p_c`` = mean softmax probability of the true class over the
  foreground RoIs of the batch,
* localization precision ``p_l`` = mean IoU between the box decoded from the predicted
  deltas for the true class and its matched ground-truth box, over the same RoIs.

Inputs follow torchvision's ``RoIHeads``/``fastrcnn_loss`` conventions: ``labels`` holds
0 for background, ``regression_targets`` are ``box_coder.encode(matched_gt, proposals)``
with ``BoxCoder(weights=(10, 10, 5, 5))``. Per-image lists (as ``RoIHeads`` produces them)
are accepted and concatenated. All functions run under ``torch.no_grad`` and return plain
Python floats, or ``None`` when the batch has no foreground RoI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

__all__ = [
    "TaskPrecision",
    "DEFAULT_BOX_CODER_WEIGHTS",
    "classification_precision",
    "localization_precision",
    "paired_box_iou",
    "compute_task_precision",
]

#: torchvision's Fast R-CNN box-coder weights (``RoIHeads`` default ``bbox_reg_weights``).
DEFAULT_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

TensorOrList = Union[Tensor, Sequence[Tensor]]


@dataclass(frozen=True)
class TaskPrecision:
    """One batch's task precisions, passed to ``TaskBalancer.observe``.

    ``p_cls``/``p_loc`` are in [0, 1] (or ``None`` when unknown). ``n_fg`` is the number of
    foreground RoIs they were computed from; ``None`` means "not given", and ``0`` marks an
    empty batch that balancers must ignore.
    """

    p_cls: Optional[float] = None
    p_loc: Optional[float] = None
    n_fg: Optional[int] = None

    @property
    def valid(self) -> bool:
        """True when both precisions are finite numbers from a non-empty batch."""
        if self.n_fg is not None and self.n_fg <= 0:
            return False
        for p in (self.p_cls, self.p_loc):
            if p is None or not math.isfinite(float(p)):
                return False
        return True

    def as_dict(self) -> dict[str, float]:
        """Flat float dict for metric logging (missing values are skipped)."""
        out: dict[str, float] = {}
        if self.p_cls is not None:
            out["p_cls"] = float(self.p_cls)
        if self.p_loc is not None:
            out["p_loc"] = float(self.p_loc)
        if self.n_fg is not None:
            out["n_fg"] = float(self.n_fg)
        return out


def _cat(x: TensorOrList) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.cat(list(x), dim=0)


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Elementwise IoU of ``boxes1[i]`` with ``boxes2[i]`` (both ``[N, 4]`` in x1y1x2y2).

    Equals ``torchvision.ops.box_iou(boxes1, boxes2).diagonal()`` without the N x N matrix.
    Degenerate (zero-area) pairs give 0.
    """
    if boxes1.shape != boxes2.shape or boxes1.shape[-1] != 4:
        raise ValueError(f"expected two [N, 4] tensors, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


@torch.no_grad()
def classification_precision(class_logits: Tensor, labels: TensorOrList) -> Optional[float]:
    """Mean softmax probability of the true class over foreground RoIs (``labels > 0``).

    ``class_logits``: ``[R, C]`` (C includes background at index 0); ``labels``: ``[R]``.
    Returns ``None`` when no RoI is foreground.
    """
    labels = _cat(labels).to(class_logits.device).long()
    if class_logits.dim() != 2 or labels.shape[0] != class_logits.shape[0]:
        raise ValueError(
            f"class_logits must be [R, C] and labels [R]; got {tuple(class_logits.shape)} and {tuple(labels.shape)}"
        )
    fg = torch.nonzero(labels > 0).squeeze(1)
    if fg.numel() == 0:
        return None
    probs = torch.softmax(class_logits[fg].detach().float(), dim=-1)
    p_true = probs.gather(1, labels[fg].unsqueeze(1)).squeeze(1)
    return float(p_true.mean())


def _true_class_deltas(box_regression: Tensor, labels_fg: Tensor, fg: Tensor) -> Tensor:
    """Pick the 4 deltas of each foreground RoI's true class (class-agnostic if ``[R, 4]``)."""
    if box_regression.dim() != 2 or box_regression.shape[1] % 4 != 0:
        raise ValueError(f"box_regression must be [R, 4] or [R, C*4]; got {tuple(box_regression.shape)}")
    if box_regression.shape[1] == 4:
        return box_regression[fg]
    per_class = box_regression.reshape(box_regression.shape[0], -1, 4)
    if int(labels_fg.max()) >= per_class.shape[1]:
        raise ValueError(
            f"label {int(labels_fg.max())} out of range for box_regression with {per_class.shape[1]} classes"
        )
    return per_class[fg, labels_fg]


@torch.no_grad()
def localization_precision(
    box_regression: Tensor,
    labels: TensorOrList,
    regression_targets: TensorOrList,
    proposals: TensorOrList,
    box_coder: Optional[BoxCoder] = None,
) -> Optional[float]:
    """Mean IoU of the regressed box with its matched ground truth over foreground RoIs.

    For each foreground RoI ``i`` (``labels[i] > 0``), the predicted deltas of its true
    class are decoded against ``proposals[i]``; the ground truth is recovered by decoding
    ``regression_targets[i]`` against the same proposal (the targets were produced by
    ``box_coder.encode(matched_gt, proposals)``). ``box_coder`` defaults to torchvision's
    ``BoxCoder((10, 10, 5, 5))``; pass ``roi_heads.box_coder`` to match a custom model.

    Shapes: ``box_regression`` ``[R, C*4]`` (class-specific) or ``[R, 4]`` (class-agnostic),
    ``labels`` ``[R]``, ``regression_targets`` ``[R, 4]``, ``proposals`` ``[R, 4]``.
    Returns ``None`` when no RoI is foreground.
    """
    coder = box_coder if box_coder is not None else BoxCoder(DEFAULT_BOX_CODER_WEIGHTS)
    device = box_regression.device
    labels = _cat(labels).to(device).long()
    targets = _cat(regression_targets).to(device).float()
    props = _cat(proposals).to(device).float()
    n = box_regression.shape[0]
    if not (labels.shape[0] == targets.shape[0] == props.shape[0] == n):
        raise ValueError(
            "box_regression, labels, regression_targets and proposals must have the same number of rows; got "
            f"{n}, {labels.shape[0]}, {targets.shape[0]}, {props.shape[0]}"
        )
    fg = torch.nonzero(labels > 0).squeeze(1)
    if fg.numel() == 0:
        return None
    deltas = _true_class_deltas(box_regression.detach().float(), labels[fg], fg)
    pred_boxes = coder.decode_single(deltas, props[fg])
    gt_boxes = coder.decode_single(targets[fg], props[fg])
    return float(paired_box_iou(pred_boxes, gt_boxes).mean())


@torch.no_grad()
def compute_task_precision(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: TensorOrList,
    regression_targets: TensorOrList,
    proposals: TensorOrList,
    box_coder: Optional[BoxCoder] = None,
) -> TaskPrecision:
    """Both precisions of one batch as a :class:`TaskPrecision` (``n_fg == 0`` if empty)."""
    labels_t = _cat(labels)
    n_fg = int((labels_t > 0).sum())
    if n_fg == 0:
        return TaskPrecision(p_cls=None, p_loc=None, n_fg=0)
    return TaskPrecision(
        p_cls=classification_precision(class_logits, labels_t),
        p_loc=localization_precision(box_regression, labels_t, regression_targets, proposals, box_coder),
        n_fg=n_fg,
    )
