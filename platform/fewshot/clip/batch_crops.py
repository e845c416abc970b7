"""Batched box crops for the CLIP teacher, on tensors (math layer: torch only).

:func:`crop_boxes` cuts the same square, context-padded crops as
:func:`catalog.captions.crop_box` (the crops the teacher was trained and fitted on: the
box's longer side times ``1 + 2 * context``, at least ``min_side``, centred on the box,
border pixels repeated outside the image), but for every box of an image in one
``torchvision.ops.roi_align`` call on the images' device (adaptive sampling stands in for
PIL's antialiased resize). :func:`clip_probs_batched` embeds all crops
with one teacher call and turns them into class probabilities.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["square_boxes", "crop_boxes", "clip_probs_batched"]


def square_boxes(boxes: torch.Tensor, context: float, min_side: float = 8.0) -> torch.Tensor:
    """[n, 4] x1 y1 x2 y2 -> the squares the teacher sees (same centre, side
    ``max(w, h, 1) * (1 + 2 * context)``, at least ``min_side``)."""
    boxes = boxes.float()
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    side = (side * (1.0 + 2.0 * context)).clamp(min=float(min_side))
    half = side / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def crop_boxes(images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], size: int,
               context: float = 0.2, min_side: float = 8.0) -> torch.Tensor:
    """Crops [N, 3, size, size] (values as in ``images``) of all ``boxes`` ([n_i, 4] pixels
    of image i, [3, H_i, W_i]) in order: image 0's boxes first.

    ``torchvision.ops.roi_align`` with adaptive sampling (each output pixel averages the
    source pixels it covers, like an antialiased resize) on the image padded by repeating
    its border as far as the squares reach outside it."""
    from torchvision.ops import roi_align

    out = []
    for image, bx in zip(images, boxes, strict=True):
        if bx.shape[0] == 0:
            continue
        if image.ndim != 3:
            raise ValueError(f"expected a [3, H, W] image, got shape {tuple(image.shape)}")
        _, h, w = image.shape
        sq = square_boxes(bx.to(image.device), context, min_side)
        reach = torch.cat([-sq[:, :2].min(dim=0).values, sq[:, 2:].max(dim=0).values - sq.new_tensor([w, h])])
        pad = int(math.ceil(max(float(reach.max()), 0.0))) + 1
        src = image.float().unsqueeze(0)
        if pad > 0:
            src = F.pad(src, (pad, pad, pad, pad), mode="replicate")
        rois = torch.cat([sq.new_zeros((sq.shape[0], 1)), sq + pad], dim=1)
        out.append(roi_align(src, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True))
    if not out:
        c = images[0].shape[0] if len(images) else 3
        return torch.zeros((0, c, size, size))
    return torch.cat(out)


@torch.no_grad()
def clip_probs_batched(refiner, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]
                       ) -> list[torch.Tensor]:
    """CLIP class probabilities [n_i, C] for the boxes of each image, one teacher call.

    ``refiner`` is a :class:`fewshot.clip.refinement.Refiner` (teacher loaded); ``images`` are
    [3, H, W] float tensors in 0..1 (any device)."""
    from fewshot.clip.refinement import clip_class_probs

    teacher = refiner.teacher
    counts = [int(b.shape[0]) for b in boxes]
    if sum(counts) == 0:
        return [torch.zeros((0, len(refiner.class_names))) for _ in counts]
    crops = crop_boxes(images, boxes, teacher.image_size, context=teacher.box_context)
    crops = crops.clamp_(0.0, 1.0)
    x = (crops - teacher._mean.to(crops.device)) / teacher._std.to(crops.device)
    emb = teacher.encode_pixels(x)
    probs = clip_class_probs(emb, refiner.prompt_embeddings, refiner.temperature)
    return list(torch.split(probs, counts))
