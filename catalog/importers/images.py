"""Image decoding and normalisation shared by the COCO and VOC importers.

Every image that enters the catalog is

1. fully decoded with PIL (``img.load()``), so a truncated or corrupt file is caught at import
   time with an error that names it, not in the middle of a training run;
2. EXIF-transposed (``ImageOps.exif_transpose``): a phone photo stored sideways with an
   orientation tag is stored upright, and the stored ``width``/``height`` are the *displayed*
   ones. **Assumption:** annotation boxes refer to the displayed (upright) orientation, which is
   COCO's convention and what annotation tools that show the photo upright produce. When the
   annotated size matches the *stored* (un-rotated) size instead, the import still assumes
   displayed coordinates and counts the image under ``size_mismatch`` with a warning;
3. converted to 8-bit RGB (grayscale, 16-bit grayscale, CMYK, palette, RGBA/LA, YCbCr ...);
4. stored as bytes: unchanged when the file already is an upright RGB JPEG or PNG (no
   generational loss, no cost), otherwise re-encoded as JPEG quality 95 when the source was a
   JPEG and as PNG for every other source format;
5. given a content hash of the stored image's pixels (:mod:`catalog.content_hash`), which the
   import uses to find the same image in two splits whatever its file names.
"""
from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from catalog.content_hash import image_bytes_sha256, image_sha256

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class SourceImage:
    """One image of a source dataset and its annotations, before decoding.

    ``boxes`` are float xyxy pixels in the displayed orientation, not yet clipped.
    ``iscrowd`` carries COCO ``iscrowd`` or VOC ``difficult``: such boxes are ignored in
    training and respected (as "ignore" regions) in evaluation.
    """

    image_id: int
    file_name: str  # as stored in the catalog
    path: Path  # where the file is on disk
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    iscrowd: list[bool] = field(default_factory=list)
    declared_size: tuple[int, int] | None = None  # (width, height) from the annotations


@dataclass
class NormalizedImage:
    data: bytes  # encoded JPEG or PNG, RGB, upright
    width: int
    height: int
    raw_size: tuple[int, int]  # (width, height) as stored in the file, before EXIF transpose
    conversions: tuple[str, ...] = ()  # subset of validation.CONVERSIONS
    reencoded: bool = False
    content_sha256: str = ""  # catalog.content_hash of the stored image


class ImageDecodeError(Exception):
    """Raised by :func:`normalize_image` for a file PIL cannot fully decode."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB version of ``img`` and the name of the conversion made (None if none)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max(initial=0.0)), 1.0)
        if mode != "F" and top <= 255.0:
            top = 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB"), "grayscale"
    if mode in _GRAY_MODES:
        return img.convert("RGB"), "grayscale"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode in ("P", "PA"):
        return img.convert("RGB"), "palette"
    if mode in ("RGBA", "RGBa", "RGBX"):
        return img.convert("RGB"), "alpha"
    return img.convert("RGB"), "other_mode"


def normalize_image(path: str | os.PathLike) -> NormalizedImage:
    """Decode, verify, EXIF-transpose and convert one image (see the module docstring)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.load()  # a full decode: truncated files fail here
            raw_size = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            conversions: list[str] = []
            out = img
            if orientation not in (None, 1):
                transposed = ImageOps.exif_transpose(img)
                if transposed is not None:
                    out = transposed
                    conversions.append("exif_rotated")
            out, conv = _to_rgb(out)
            if conv:
                conversions.append(conv)
            if not conversions and fmt in ("JPEG", "PNG") and getattr(img, "n_frames", 1) == 1:
                # stored as it came: the pixels just decoded are the stored image's
                return NormalizedImage(path.read_bytes(), out.width, out.height, raw_size,
                                       content_sha256=image_sha256(out))
            buf = io.BytesIO()
            if fmt in ("JPEG", "MPO"):
                out.save(buf, format="JPEG", quality=JPEG_QUALITY)
                data = buf.getvalue()
                digest = image_bytes_sha256(data)  # lossy: hash what is stored
            else:
                out.save(buf, format="PNG")
                data = buf.getvalue()
                digest = image_sha256(out)  # lossless: the stored pixels are these
            return NormalizedImage(data, out.width, out.height, raw_size,
                                   tuple(conversions), reencoded=True, content_sha256=digest)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(path, f"cannot be decoded ({exc})") from None


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                window: int = 32) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``window`` items in flight.

    PIL releases the GIL while decoding and encoding, so threads give a real speed-up without
    holding a whole dataset of decoded images in memory.
    """
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import-img") as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def list_image_files(folder: Path) -> set[str]:
    """Relative POSIX paths of every image file under ``folder`` (recursively)."""
    found: set[str] = set()
    folder = Path(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.add((rel / name).as_posix())
    return found


@dataclass
class SourceDataset:
    """A parsed annotation source, split by split, ready to be decoded and written."""

    format: str  # "coco" | "voc"
    source: str  # the annotation file or folder, for reports and the manifest
    images_root: Path  # the folder image paths are resolved against (for error messages)
    categories: list  # list[catalog.schema.Category], ids as the source has them
    splits: dict[str, list[SourceImage]]
    unreferenced_files: int = 0
    unassigned_images: int = 0
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
