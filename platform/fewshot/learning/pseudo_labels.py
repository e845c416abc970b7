"""Old-class pseudo-labels on an increment's support images.

K-shot sampling (:mod:`catalog.kshot`, TFA's protocol, Wang et al. 2020) keeps only the
annotations of the class an image was taken for; every other object in the image becomes
unannotated background. In the embedded world's 5-shot draw of split1 (seed 0) the support
set holds 387 objects and 100 annotations: 217 of its 292 objects of the *old* classes are
labelled background. A fine-tune that trains the box head (``--freeze backbone`` and looser)
is then taught that the parent's own classes are background on exactly the images it learns
from. Kaul, Xie and Zisserman ("Label, Verify, Correct: A Simple Few Shot Object Detection
Method", CVPR 2022, Sec. 1 and 3) name this missing-annotation problem of few-shot detection
data and answer it for the new classes with pseudo-annotations.

For the old classes the parent knows the answer: its confident detections become annotations
of their classes, the old model acting as the teacher of the old classes (Shmelkov, Schmid and
Alahari, "Incremental Learning of Object Detectors without Catastrophic Forgetting", ICCV 2017,
do this by distilling the old network's outputs; here they are hard labels, so the detector's
own losses and every balancer and distillation see them like the user's boxes).

The rule (:func:`select_pseudo_boxes`), per image:

1. the parent's detections with score ``>= threshold`` (torchvision's post-processing has
   already applied per-class NMS);
2. class-agnostic NMS at ``iou`` among them, so one object yields one label (two classes'
   boxes on one object would otherwise both be kept);
3. a detection overlapping any annotated box of the image at IoU ``>= iou`` is dropped: the
   user's label wins, including on a new-class object the parent mistakes for an old class.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

from fewshot.metrics.coco_eval import run_over_rows

__all__ = ["PseudoLabelStats", "select_pseudo_boxes", "pseudo_label_rows"]


@dataclass(frozen=True)
class PseudoLabelStats:
    """What pseudo-labelling added: images seen, boxes the user annotated, boxes added."""

    images: int
    annotated: int
    added: int


def select_pseudo_boxes(boxes: Tensor, labels: Tensor, scores: Tensor, annotated: Tensor,
                        threshold: float, iou: float = 0.5) -> tuple[Tensor, Tensor]:
    """The detections of one image that become labels: ``(boxes [N, 4] xyxy, labels [N])``.

    ``boxes``/``labels``/``scores``: the parent's detections (torchvision's output);
    ``annotated``: the image's annotated boxes [M, 4] xyxy. See the module docstring."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    keep = scores >= threshold
    boxes, labels, scores = boxes[keep].float(), labels[keep], scores[keep].float()
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), labels
    keep = nms(boxes, scores, iou)
    boxes, labels = boxes[keep], labels[keep]
    annotated = annotated.reshape(-1, 4).to(boxes)
    if annotated.numel():
        free = box_iou(boxes, annotated).max(dim=1).values < iou
        boxes, labels = boxes[free], labels[free]
    return boxes, labels


def pseudo_label_rows(model: torch.nn.Module, rows: Sequence[Mapping], category_ids: Sequence[int],
                      threshold: float, *, iou: float = 0.5, batch_size: int = 8,
                      device: str | torch.device | None = None, precision: str = "fp32"
                      ) -> tuple[list[dict], PseudoLabelStats]:
    """``rows`` with the parent's confident detections added as annotations.

    ``model``: the parent detector, whose label ``i`` (1-based, torchvision's) is the catalog
    category ``category_ids[i - 1]``. Rows come back in the same order, as new dicts (the
    input is not changed); added boxes are never crowd. ``device``/``precision``: see
    :func:`fewshot.metrics.coco_eval.run_over_rows` (which runs the rows in order)."""
    rows = list(rows)
    out: list[dict] = []

    def collect(batch, _images, outputs):
        for row, det in zip(batch, outputs):
            have = torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4)
            boxes, labels = select_pseudo_boxes(det["boxes"].detach().cpu(), det["labels"].cpu(),
                                                det["scores"].detach().cpu(), have, threshold, iou)
            cats = [int(category_ids[int(l) - 1]) for l in labels]
            out.append({**row, "boxes": list(row["boxes"]) + boxes.tolist(),
                        "category_ids": list(row["category_ids"]) + cats,
                        "iscrowd": list(row["iscrowd"]) + [False] * len(cats)})

    run_over_rows(model, rows, collect, batch_size, device=device, precision=precision)
    annotated = sum(len(r["category_ids"]) for r in rows)
    added = sum(len(r["category_ids"]) for r in out) - annotated
    return out, PseudoLabelStats(images=len(rows), annotated=annotated, added=added)
