"""Batched box crops for the CLIP teacher, on tensors (math layer: torch only).

:func:`crop_boxes` cuts the same square, context-padded crops as
:func:`catalog.captions.crop_box` (the crops the teacher was trained and fitted on: the
box's longer side times ``1 + 2 * context``, at least ``min_side``, centred on the box,
border pixels repeated outside the image), but for every box of every image at once, on
the images' device, with ``grid_sample``: each output pixel averages ``k x k`` bilinear
samples (``k`` = how many source pixels one output pixel spans, at most ``max_samples``),
which stands in for PIL's antialiased resize. :func:`clip_probs_batched` embeds all crops
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
               context: float = 0.2, min_side: float = 8.0, max_samples: int = 4) -> torch.Tensor:
    """Crops [N, 3, size, size] (values as in ``images``) of all ``boxes`` ([n_i, 4] pixels
    of image i, [3, H_i, W_i]) in order: image 0's boxes first."""
    out = []
    for image, bx in zip(images, boxes, strict=True):
        if bx.shape[0] == 0:
            continue
        if image.ndim != 3:
            raise ValueError(f"expected a [3, H, W] image, got shape {tuple(image.shape)}")
        _, h, w = image.shape
        sq = square_boxes(bx.to(image.device), context, min_side)
        side = sq[:, 2] - sq[:, 0]
        k = int(min(max(math.ceil(float(side.max()) / size), 1), max_samples))
        n, m = sq.shape[0], size * k
        # sample positions (pixel units, pixel j covers [j, j + 1)) of an m x m grid per box
        t = (torch.arange(m, device=image.device, dtype=torch.float32) + 0.5) / m  # [m] in (0, 1)
        xs = sq[:, 0:1] + t[None, :] * side[:, None]  # [n, m]
        ys = sq[:, 1:2] + t[None, :] * side[:, None]
        gx = (2.0 * xs / w - 1.0)[:, None, :].expand(n, m, m)
        gy = (2.0 * ys / h - 1.0)[:, :, None].expand(n, m, m)
        grid = torch.stack([gx, gy], dim=-1)  # [n, m, m, 2]
        src = image.float().unsqueeze(0).expand(n, -1, -1, -1)
        crops = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out.append(F.avg_pool2d(crops, k) if k > 1 else crops)
    if not out:
        c = images[0].shape[0] if len(images) else 3
        return torch.zeros((0, c, size, size))
    return torch.cat(out)


@torch.no_grad()
def clip_probs_batched(refiner, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]
                       ) -> list[torch.Tensor]:
    """CLIP class probabilities [n_i, C] for the boxes of each image, one teacher call.

    ``refiner`` is a :class:`fewshot.refinement.Refiner` (teacher loaded); ``images`` are
    [3, H, W] float tensors in 0..1 (any device)."""
    from fewshot.refinement import clip_class_probs

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
