"""Bounded decoding of an encoded image into what a detector can take (math layer: PIL only).

Serve's ``/v1/detect`` and the MLflow pyfunc flavour decode with this one function, so both
answer the same for the same bytes. Every failure is an :class:`ImageError` with a ``kind``
(the HTTP layer maps kinds to statuses); nothing else escapes :func:`decode_image`.

Resources are bounded before pixels are allocated:

- ``max_bytes`` caps the encoded size;
- the header's size is checked against ``max_pixels`` before decoding. A JPEG is first
  switched to a DCT-scaled draft (1/2, 1/4 or 1/8 per side) no smaller than what the
  detector resizes it to, so a large photo decodes at a fraction of its pixels and only the
  draft's size counts against ``max_pixels``;
- other formats, once decoded, are reduced by an integer factor (box filter) down to no
  smaller than the detector's input, so every later step works on at most ~2x the model's
  input per side.

Boxes found on the decoded image are mapped back to the uploaded image's pixels with
:attr:`DecodedImage.scale`.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageError", "DecodedImage", "decode_image", "resized_size", "DEFAULT_MAX_PIXELS",
           "DEFAULT_MAX_BYTES", "MIN_MODEL_SIDE"]

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
# 12 MP decoded at most (36 MiB as RGB). JPEGs count after their draft step, so a 48 MP
# photo decodes at 1/2..1/8 per side and is accepted; a 12+ MP PNG is not.
DEFAULT_MAX_PIXELS = 12_000_000
# The detector resizes every image so its short side is min_size unless its long side would
# pass max_size; an image whose short side ends below this many pixels is refused (at a few
# pixels the resize makes a zero-sized tensor and the backbone has no feature map at all).
MIN_MODEL_SIDE = 16

READABLE = "JPEG, PNG, BMP, GIF, TIFF or WebP"


class ImageError(ValueError):
    """Why an upload is not an image the detector can take.

    ``kind``: ``empty``, ``too_large`` (bytes), ``too_many_pixels``, ``not_an_image``,
    ``corrupt`` (does not decode), ``bad_shape`` (the detector cannot take its aspect ratio)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for the detector and the size of the upload it came from."""

    image: Image.Image  # RGB, EXIF-oriented, possibly reduced
    width: int          # of the upload (after EXIF orientation)
    height: int

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): multiply decoded-image x/y by these to get upload pixels."""
        return self.width / self.image.width, self.height / self.image.height


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[float, float]:
    """The (w, h) torchvision's GeneralizedRCNNTransform resizes a ``width`` x ``height``
    image to (before it is padded to the size divisibility)."""
    short, long = min(width, height), max(width, height)
    scale = min(min_size / short, max_size / long)
    return width * scale, height * scale


def decode_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, model_size: tuple[int, int] | None = None,
                 min_model_side: int = MIN_MODEL_SIDE) -> DecodedImage:
    """Decode ``data`` within the bounds; ``model_size`` is the detector's
    ``(min_size, max_size)`` (enables the draft/reduce step and the aspect-ratio check)."""
    if not data:
        raise ImageError("empty", "the request carried no image bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"upload is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # as stored; EXIF may turn it by 90 degrees (same area, same ratio)
            if width < 1 or height < 1:
                raise ImageError("corrupt", f"the image declares a size of {width}x{height}")
            if model_size is not None:
                tw, th = resized_size(width, height, *model_size)
                if min(tw, th) < min_model_side:
                    ratio = max(width, height) / min(width, height)
                    raise ImageError(
                        "bad_shape",
                        f"image is {width}x{height} (aspect ratio {ratio:.1f}:1); the detector "
                        f"resizes it to {max(tw, th):.0f}x{min(tw, th):.0f} and needs at least "
                        f"{min_model_side} px on the short side, so at most "
                        f"{model_size[1] / min_model_side:.0f}:1")
                if image.format == "JPEG":  # DCT-scaled decode, no smaller than the model's input
                    image.draft("RGB", (math.ceil(tw), math.ceil(th)))
            if image.width * image.height > max_pixels:
                raise ImageError("too_many_pixels",
                                 f"image is {width}x{height} ({image.width * image.height} pixels "
                                 f"to decode); the limit is {max_pixels} pixels")
            image.load()
            loaded = image.size  # the draft's size for a drafted JPEG
            image = ImageOps.exif_transpose(image)
            if image.size != loaded:  # turned by 90 degrees: the upload is seen as height x width
                width, height = height, width
            if image.mode != "RGB":
                image = image.convert("RGB")
            if model_size is not None:
                tw, th = resized_size(image.width, image.height, *model_size)
                factor = int(min(image.width / tw, image.height / th))
                if factor >= 2:
                    image = image.reduce(factor)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_an_image",
                         f"the body is not an image format this service reads (send {READABLE})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except MemoryError:
        raise ImageError("too_many_pixels", "the image does not fit in memory") from None
    except Exception as err:  # truncated, corrupt, unsupported mode: PIL raises many kinds
        raise ImageError("corrupt", f"the image does not decode: {type(err).__name__}: {err}") from None
    return DecodedImage(image, width, height)
