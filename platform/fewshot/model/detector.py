"""The two-stage detector: torchvision Faster R-CNN assembled from a DetectorConfig.

The pieces are torchvision's (RPN, MultiScaleRoIAlign, TwoMLPHead, the transform); the box
predictor is the expandable cosine classifier of ``fewshot.model.cosine_head``. ``FewShotRoIHeads``
is torchvision's RoIHeads restricted to boxes, with one addition: in training it hands each
batch's sampled RoIs to registered observers (the precision-driven balancer reads task
precisions there, distillation reads foreground RoI features); and at inference each class's score
is the classifier's ``probabilities`` (per-increment scoring, ``fewshot.model.cosine_head``),
with the columns of retained heads (``fewshot.model.retained_heads``) answered by them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops

from fewshot.model.backbones import build_backbone
from fewshot.model.presets import DetectorConfig
from fewshot.model.cosine_head import CosineBoxPredictor
from fewshot.model.retained_heads import RetainedHeads, merge_retained


@dataclass
class RoIBatch:
    """What the box head saw in one training step (all RoIs sampled across the batch)."""

    features: torch.Tensor  # [R, D] shared RoI features (box_head output)
    class_logits: torch.Tensor  # [R, C]
    box_regression: torch.Tensor  # [R, C*4]
    labels: torch.Tensor  # [R] class index, 0 = background
    regression_targets: torch.Tensor  # [R, 4]
    proposals: torch.Tensor  # [R, 4]
    image_index: torch.Tensor  # [R] which image of the batch each RoI came from
    matched_idxs: torch.Tensor  # [R] index of the matched ground-truth box within its image
    targets: list  # the batch's targets (dicts; may carry per-box extras such as teacher embeddings)
    pooled: torch.Tensor | None = None  # [R, C, h, w] the RoI-aligned features the box head read


class FewShotRoIHeads(RoIHeads):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.observers: list[Callable[[RoIBatch], dict | None]] = []
        self.extra_losses: Callable[[RoIBatch], dict[str, torch.Tensor]] | None = None
        self.retained: RetainedHeads | None = None   # set by build_detector

    def retained_outputs(self, pooled: torch.Tensor):
        """The retained heads' probabilities and box deltas (None when there are none)."""
        return self.retained(pooled) if self.retained is not None and len(self.retained) else None

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        box_features = self.box_head(pooled)
        class_logits, box_regression = self.box_predictor(box_features)

        result: list[dict[str, torch.Tensor]] = []
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(
                class_logits, box_regression, labels, regression_targets
            )
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            if self.observers or self.extra_losses is not None:
                batch = RoIBatch(
                    features=box_features,
                    class_logits=class_logits,
                    box_regression=box_regression,
                    labels=torch.cat(labels),
                    regression_targets=torch.cat(regression_targets),
                    proposals=torch.cat(proposals),
                    image_index=torch.cat(
                        [torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(proposals)]
                    ).to(box_features.device),
                    matched_idxs=torch.cat(matched_idxs),
                    targets=targets,
                    pooled=pooled,
                )
                for observe in self.observers:
                    observe(batch)
                if self.extra_losses is not None:
                    losses.update(self.extra_losses(batch))
        else:
            # the retained heads run only where they answer: under per-increment scoring
            joint = self.box_predictor.cls_score.scoring == "joint"
            boxes, scores, labels = self.postprocess_detections(
                class_logits, box_regression, proposals, image_shapes,
                retained=None if joint else self.retained_outputs(pooled),
            )
            for b, s, l in zip(boxes, scores, labels):
                result.append({"boxes": b, "labels": l, "scores": s})
        return result, losses

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes, retained=None):
        """torchvision's post-processing (decode, clip, drop background, score threshold, tiny
        boxes, per-class NMS, top detections) with the classifier's class probabilities in place
        of the plain softmax; with joint scoring it is torchvision's own. ``retained``: the
        retained heads' outputs on the same RoIs (:meth:`retained_outputs`), which answer their
        columns under per-increment scoring; each head (every retained one, and the live one)
        then keeps its own ``detections_per_img`` best detections, so the old classes keep the
        detections their parent served (``fewshot.model.retained_heads``)."""
        classifier = self.box_predictor.cls_score
        if classifier.scoring == "joint":
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        probabilities, box_regression = merge_retained(classifier.probabilities(class_logits), box_regression,
                                                       retained)
        per_image = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals).split(per_image, 0)
        scores_all = probabilities.split(per_image, 0)
        num_classes = class_logits.shape[-1]
        # the first column each head answers: the live head's alone without retained heads
        firsts = ([h.start for h in self.retained.heads] + [self.retained.end]) if retained is not None else [1]
        firsts = torch.tensor(firsts[1:], device=class_logits.device)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(boxes_all, scores_all, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=scores.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)   # by decreasing score
            if len(firsts):
                head = torch.bucketize(labels[keep], firsts, right=True)
                keep = torch.cat([keep[head == h][: self.detections_per_img] for h in range(len(firsts) + 1)])
                keep = keep[scores[keep].argsort(descending=True, stable=True)]
            else:
                keep = keep[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


def _rpn_outputs_fp32(module, inputs, output):
    """Forward hook on the RPN head: objectness and box deltas in fp32 under autocast (the box
    coder decodes in the deltas' dtype; bf16 proposals would be off by several pixels). A no-op
    for fp32 tensors, so fp32 results are unchanged."""
    logits, deltas = output
    return [t.float() for t in logits], [t.float() for t in deltas]


def build_detector(config: DetectorConfig, num_classes: int) -> FasterRCNN:
    """A Faster R-CNN with ``num_classes`` rows (background included) in its cosine classifier."""
    backbone = build_backbone(config)
    anchor_sizes = config.anchor_sizes
    featmap_names = ["0"] if config.backbone == "tiny" else ["0", "1", "2", "3"]
    anchor_generator = AnchorGenerator(
        sizes=anchor_sizes, aspect_ratios=(config.aspect_ratios,) * len(anchor_sizes)
    )
    roi_pool = MultiScaleRoIAlign(
        featmap_names=featmap_names,
        output_size=config.roi_output_size,
        sampling_ratio=config.roi_sampling_ratio,
    )
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rpn_anchor_generator=anchor_generator,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(
            backbone.out_channels * config.roi_output_size**2, config.representation_size
        ),
        box_predictor=CosineBoxPredictor(config.representation_size, num_classes, config.cosine_scale),
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.box_detections_per_img,
        box_batch_size_per_image=config.roi_batch_size_per_image,
        box_positive_fraction=config.roi_positive_fraction,
    )
    old = model.roi_heads
    model.roi_heads = FewShotRoIHeads(
        old.box_roi_pool,
        old.box_head,
        old.box_predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=config.roi_batch_size_per_image,
        positive_fraction=config.roi_positive_fraction,
        bbox_reg_weights=None,
        score_thresh=config.box_score_thresh,
        nms_thresh=config.box_nms_thresh,
        detections_per_img=config.box_detections_per_img,
    )
    model.roi_heads.retained = RetainedHeads(
        backbone.out_channels * config.roi_output_size**2, config.representation_size, config.cosine_scale)
    model.rpn.head.register_forward_hook(_rpn_outputs_fp32)
    return model


def box_predictor(model: nn.Module) -> CosineBoxPredictor:
    return model.roi_heads.box_predictor
