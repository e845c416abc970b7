"""Turn an uploaded body into an RGB image, or say precisely why it is not one.

Each failure maps to an HTTP status: 400 empty body, 413 too large (bytes or pixels),
415 not an image at all, 422 an image that does not decode (truncated, corrupt).
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError


class ImageRejected(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def decode_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected(400, "empty_body", "the request carried no image bytes")
    if len(data) > max_bytes:
        raise ImageRejected(413, "too_large", f"upload is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageRejected(413, "too_many_pixels",
                                    f"image is {image.width}x{image.height}; the limit is {max_pixels} pixels")
            image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(415, "not_an_image", "the body is not an image format this service reads "
                                                  "(send JPEG, PNG, BMP, GIF, TIFF or WebP)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageRejected(413, "too_many_pixels", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected(422, "corrupt_image", f"the image does not decode: {err}") from None
    from PIL import ImageOps

    return ImageOps.exif_transpose(image).convert("RGB")
