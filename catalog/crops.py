"""Box crops: the one rule for cutting an object out of an image for a CLIP model.

Shared by the captioned corpus the embedded teacher is pretrained on
(:mod:`catalog.captions`) and by the teacher itself when it embeds detector boxes
(:mod:`fewshot.clip.teacher`), so that the teacher sees boxes at test time the way it saw them
in training. Numpy and PIL only, like the rest of the catalog.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["to_uint8_rgb", "crop_box"]


def to_uint8_rgb(image) -> np.ndarray:
    """PIL image, (H, W, 3) array, or encoded PNG/JPEG bytes -> (H, W, 3) uint8 array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.clip(arr.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    return arr[..., :3]


def crop_box(image: np.ndarray, box: Sequence[float], size: int = 64, context: float = 0.2,
             jitter: float = 0.0, rng: np.random.Generator | None = None,
             min_side: float = 8.0) -> np.ndarray:
    """A square ``size`` x ``size`` crop around ``box`` (``[x1, y1, x2, y2]`` pixels).

    The square's side is the box's longer side times ``1 + 2 * context`` (at least
    ``min_side`` px), centred on the box; parts outside the image are filled by repeating
    the border pixels. ``jitter`` (with ``rng``) shifts the centre and scales the side by up
    to that fraction, for training-time variety.
    """
    img = to_uint8_rgb(image)
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * context)
    if jitter > 0 and rng is not None:
        side *= math.exp(rng.uniform(-jitter, jitter))
        cx += rng.uniform(-jitter, jitter) * side / 2
        cy += rng.uniform(-jitter, jitter) * side / 2
    side = max(side, float(min_side))
    left, top = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
    right, bottom = int(math.ceil(cx + side / 2)), int(math.ceil(cy + side / 2))
    pad = max(0, -left, -top, right - w, bottom - h)
    if pad:
        img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    patch = img[top + pad:bottom + pad, left + pad:right + pad]
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.BILINEAR))
