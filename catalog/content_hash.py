"""Content hashes: the identity of an image, whatever its file is called.

Every catalog row carries ``content_sha256``: the SHA-256 of the image's *decoded pixels*,
upright and 8-bit RGB, prefixed by its size::

    sha256(b"rgb8 <width> <height>\\n" + <width * height * 3 bytes, row-major RGB>)

Why pixels and not the file bytes. The catalog already decodes every image fully at import
(to catch corrupt files), so hashing the pixel buffer costs one SHA-256 pass and no extra
decode. It identifies the same picture in more disguises than a file hash does:

- the same file under another name or folder (a file hash catches this too);
- the same pixels with different metadata: EXIF stripped or edited, a comment or ICC
  profile added, other JPEG markers (a file hash misses these);
- the same image losslessly re-saved: a PNG recompressed at another level, a BMP/TIFF/PPM
  copy of a PNG (a file hash misses these);
- an EXIF-rotated original and its upright lossless copy (both are stored upright).

What it does **not** catch: a *lossy* re-encode (a JPEG saved again, at any quality), a
resize or a crop changes pixels, so exact hashing cannot see it. Those near-duplicates need a
perceptual hash and a threshold, which brings false positives on look-alike images
(microscopy slides, for one); the importer does not refuse on them.

The hash is defined on the stored bytes: for an image stored as it came, the decoded pixels
are the ones hashed at import; for an image the importer re-encoded (CMYK, palette, EXIF
rotation...), the hash is of the re-encoded image as stored, so anyone can recompute it from
the row (:func:`image_bytes_sha256`). Datasets written before the column existed read it as
null; :func:`fill_content_hashes` computes it from the ``image`` column.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

CONTENT_HASH_COLUMN = "content_sha256"
CONTENT_HASH_ALGO = "sha256:rgb8-pixels:v1"  # recorded in the manifest of every new dataset

__all__ = [
    "CONTENT_HASH_COLUMN", "CONTENT_HASH_ALGO", "pixels_sha256", "image_sha256",
    "image_bytes_sha256", "fill_content_hashes",
]


def pixels_sha256(pixels: np.ndarray) -> str:
    """Hash of an ``[H, W, 3]`` uint8 RGB array (the synthetic world hashes its renders)."""
    arr = np.ascontiguousarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 array, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    digest = hashlib.sha256(f"rgb8 {w} {h}\n".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def image_sha256(img: Image.Image) -> str:
    """Hash of a decoded PIL image that is already upright RGB (converted when not RGB)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    digest = hashlib.sha256(f"rgb8 {w} {h}\n".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def image_bytes_sha256(data: bytes) -> str:
    """Hash of encoded image bytes as the catalog stores them (decoded, upright, RGB)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        upright = ImageOps.exif_transpose(img) or img
        return image_sha256(upright)


def _try_hash(data: bytes | None) -> str | None:
    try:
        return image_bytes_sha256(data) if data else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def fill_content_hashes(table: pa.Table) -> pa.Table:
    """``table`` with a ``content_sha256`` column, computed from ``image`` where the column
    is absent or null (rows of datasets written before the column existed). Rows whose
    ``image`` cannot be decoded (annotation-only tables built in tests) stay null."""
    names = table.column_names
    if CONTENT_HASH_COLUMN in names:
        col = table.column(CONTENT_HASH_COLUMN)
        if col.null_count == 0:
            return table
        current = col.to_pylist()
    else:
        current = [None] * table.num_rows
    if "image" not in names:
        raise KeyError("cannot compute content hashes: the table has no 'image' column")
    images = table.column("image")
    values = [h if h is not None else _try_hash(images[i].as_py())
              for i, h in enumerate(current)]
    arr = pa.array(values, type=pa.string())
    if CONTENT_HASH_COLUMN in names:
        return table.set_column(names.index(CONTENT_HASH_COLUMN), CONTENT_HASH_COLUMN, arr)
    return table.append_column(CONTENT_HASH_COLUMN, arr)
