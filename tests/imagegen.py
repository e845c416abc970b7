"""Small images for the serving tests: encoded bytes and a plain scene with a few blocks."""
import io

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene(w: int = 160, h: int = 120, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), 200, np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
        arr[y:y + rng.integers(10, 30), x:x + rng.integers(10, 30)] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)
