"""Continual head expansion: grow the classifier by one imprinted row per new class.

The new row of class c is the normalised mean of the box-head features of its support boxes
(weight imprinting, Qi et al., CVPR 2018, Eq. 2), computed with the parent model exactly as it
will see them at inference (same transform, RoIAlign and box head). Every old row moves into
the frozen block unchanged (see ``fewshot.model.cosine_head``), and the increment's rows end at
a recorded index, so the child can score each class against the classes it was added beside
(``scoring``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.model.cosine_head import Scoring, imprint_rows
from fewshot.model.devices import model_device, move_batch


@torch.no_grad()
def support_roi_features(
    model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-head features of the ground-truth boxes: ([N, D], labels [N]), computed on the
    model's device (the support batch is moved there) in fp32."""
    was_training = model.training
    model.eval()
    images, targets = move_batch(images, targets, model_device(model))
    image_list, resized = model.transform(images, [dict(t) for t in targets])
    features = model.backbone(image_list.tensors)
    boxes = [t["boxes"] for t in resized]
    pooled = model.roi_heads.box_roi_pool(features, boxes, image_list.image_sizes)
    feats = model.roi_heads.box_head(pooled)
    labels = torch.cat([t["labels"] for t in resized])
    model.train(was_training)
    return feats, labels


@torch.no_grad()
def expand_detector(
    model: nn.Module,
    support_images: list[torch.Tensor],
    support_targets: list[dict[str, torch.Tensor]],
    num_new: int,
    center_images: list[torch.Tensor] | None = None,
    center_targets: list[dict[str, torch.Tensor]] | None = None,
    scoring: Scoring | None = None,
    retain_head: bool = False,
) -> list[int]:
    """Append ``num_new`` classes; their support labels must be old_count+1 .. old_count+num_new.

    ``center_images``/``center_targets`` (e.g. the replay exemplars of the old classes): their
    box features and the support's give the mean that imprinting subtracts (see
    ``imprint_rows``). ``scoring``: how the expanded model scores classes (``per-increment`` or
    ``joint``, :class:`fewshot.model.cosine_head.CosineClassifier`); None keeps the parent's.
    ``retain_head``: keep a frozen copy of the parent's RoI head to answer the old classes under
    per-increment scoring (:mod:`fewshot.model.retained_heads`); without it the child has no
    retained heads (its live head answers every class). Returns the new model labels.
    """
    classifier = model.roi_heads.box_predictor.cls_score
    first = classifier.num_classes  # background + existing classes: next label index
    new_labels = list(range(first, first + num_new))
    feats, labels = support_roi_features(model, support_images, support_targets)
    center = None
    if center_images:
        other, _ = support_roi_features(model, center_images, center_targets)
        center = F.normalize(torch.cat([feats, other]), dim=1).mean(dim=0)
    rows = imprint_rows(feats, labels, new_labels, center=center)
    heads = model.roi_heads
    if retain_head:
        heads.retained.keep(heads.box_head, heads.box_predictor)   # before the classifier grows
    else:
        heads.retained.clear()
    classifier.expand(rows)
    if scoring is not None:
        classifier.set_scoring(scoring)
    return new_labels
