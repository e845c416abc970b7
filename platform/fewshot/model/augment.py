"""A detection augmentation recipe on torchvision.transforms.v2 (boxes as tv_tensors.BoundingBoxes).

``detection_augment()``: horizontal flip, photometric distortion (brightness, contrast,
saturation, hue), and with probability ``zoom_out_p`` an SSD-style zoom-out (the image placed on
a larger grey canvas, so objects get smaller); boxes that end up degenerate are dropped by
SanitizeBoundingBoxes, their labels (and per-box extras such as teacher embeddings) with them.

``dihedral_augment()``: the eight symmetries of the square (a horizontal flip and a rotation by
0, 90, 180 or 270 degrees; the dihedral group D4) plus the photometric distortion, no zoom. It
suits worlds whose labels do not change under these: the embedded world draws every object's
rotation uniformly from [0, 2*pi) and its colour independently of its class
(catalog/synthetic.py), so each of the eight images is another draw from the same distribution,
and right-angle rotations move boxes exactly (pixels are permuted, nothing is resampled). Not
for photographs, where up is up.

``augmented_batches`` is :func:`fewshot.model.batches.random_batches` with this recipe instead of flips
only: endless shuffled batches for in-process training.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from fewshot.model.batches import decode_row_image, row_to_target


def detection_augment(zoom_out_p: float = 0.3, max_zoom_out: float = 2.0,
                      photometric_p: float = 0.5) -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomPhotometricDistort(p=photometric_p),
        v2.RandomZoomOut(fill=0.5, side_range=(1.0, max_zoom_out), p=zoom_out_p),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_box_aligned_keys),
    ])


def dihedral_augment(photometric_p: float = 0.5) -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([v2.RandomRotation((angle, angle), expand=True) for angle in (0, 90, 180, 270)]),
        v2.RandomPhotometricDistort(p=photometric_p),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_box_aligned_keys),
    ])


RECIPES = {"v2": detection_augment, "dihedral": dihedral_augment}


def _box_aligned_keys(inputs) -> tuple[torch.Tensor, ...]:
    """Everything SanitizeBoundingBoxes must filter along with the boxes (labels, teacher_emb)."""
    target = inputs[1] if isinstance(inputs, tuple) else inputs
    return tuple(v for k, v in target.items() if k != "boxes" and isinstance(v, torch.Tensor))


def augment_sample(transform: v2.Compose, image: torch.Tensor,
                   target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply ``transform`` to an image (float in [0, 1], or uint8) and its target (``boxes``
    xyxy pixels); the image keeps its dtype."""
    h, w = image.shape[-2:]
    wrapped = {**target, "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY",
                                                          canvas_size=(h, w))}
    out_image, out_target = transform(tv_tensors.Image(image), wrapped)
    out_target = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v)
                  for k, v in out_target.items()}
    out_image = out_image.as_subclass(torch.Tensor)
    return (out_image.clamp_(0.0, 1.0) if out_image.is_floating_point() else out_image), out_target


def augmented_batches(
    rows: Sequence[Mapping],
    index: Mapping[int, int],
    batch_size: int,
    seed: int,
    transform: v2.Compose | None = None,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Endless shuffled batches of ``rows`` through ``transform`` (default :func:`detection_augment`).
    Seeds numpy's shuffling and torch's transform randomness (a private generator state is
    restored around each batch, so the caller's torch RNG stream is left alone)."""
    if not rows:
        raise ValueError("no rows to train on")
    transform = transform or detection_augment()
    rng = np.random.default_rng(seed)
    gen_state = torch.Generator().manual_seed(seed).get_state()
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(rng.permutation(len(rows)).tolist())
        take, order = order[:batch_size], order[batch_size:]
        saved = torch.get_rng_state()
        torch.set_rng_state(gen_state)
        images, targets = [], []
        for i in take:
            image, target = augment_sample(transform, decode_row_image(rows[i]["image"]),
                                           row_to_target(rows[i], index))
            images.append(image)
            targets.append(target)
        gen_state = torch.get_rng_state()
        torch.set_rng_state(saved)
        yield images, targets
