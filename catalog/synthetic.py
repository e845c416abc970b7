"""Scene composition and rendering for the synthetic detection world (numpy + PIL only).

One image is one scene: a textured background (low-frequency noise, gradients, random
lines), then 1-6 annotated objects from the 20 shape classes of :mod:`catalog.shapes`
and 0-4 clutter objects (blobs, irregular polygons, scribbles; never annotated), drawn in a
random order so that later objects may partly cover earlier ones. Every instance gets an
independent colour (from a named palette, jittered), size (~10 to ~80 px on a 160 px
image, on a log scale skewed a little toward larger sizes), rotation, aspect (0.7-1.4) and
texture (solid, stripes, dots, checker, gradient, noise), so that only the *shape*
identifies the class. :meth:`WorldConfig.preset` ``"easy"`` drops clutter, busy backgrounds
and two-tone textures for runs that get very little training.

A placement that would leave an already-placed annotated object with less than
``1 - max_occlusion`` of its pixels visible is rejected and re-drawn elsewhere. Boxes are
the tight box of each object's *visible* pixels, ``[x1, y1, x2, y2]`` in pixel-edge
coordinates (a one-pixel object at column 3 spans x 3..4), as in COCO.

Generation is deterministic: image ``index`` of split ``split`` under ``seed`` is drawn
from its own ``numpy.random.Generator`` (:func:`image_rng`), so images can be generated in
any order, in parallel, and reproduced one at a time.

Public entry points: :class:`WorldConfig`, :func:`render_scene` (numpy image plus object
records, for captioning or debugging), :func:`generate_row` (a catalog row with PNG
bytes), :func:`image_rng`, :func:`draw_boxes` (for looking at samples).
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from catalog.content_hash import pixels_sha256
from catalog.shapes import CLASS_NAMES, Outline, Stroke, clutter_outline, shape_outline

__all__ = [
    "WorldConfig", "PRESETS", "SceneObject", "Scene", "PALETTE", "TEXTURES", "BACKGROUNDS",
    "SPLIT_CODES",
    "image_rng", "render_scene", "generate_row", "encode_png", "draw_boxes",
]

# Named colours so that captions ("a red striped star") can be written from a scene.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 45),
    "green": (50, 165, 60),
    "cyan": (45, 200, 210),
    "blue": (45, 80, 215),
    "purple": (135, 60, 195),
    "pink": (240, 125, 190),
    "brown": (125, 80, 40),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.asarray([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)

TEXTURES = ("solid", "stripes", "dots", "checker", "gradient", "noise")
BACKGROUNDS = ("noise", "gradient", "lines")

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that shapes the generated images (stored in the dataset manifest)."""

    width: int = 160
    height: int = 160
    min_objects: int = 1          # annotated objects per image (inclusive range)
    max_objects: int = 6
    max_clutter: int = 4          # clutter objects per image: 0..max_clutter
    min_size: float = 10.0        # object extent (longer side, before rotation) in px,
    max_size: float = 80.0        # for a 160 px image; scaled with the image size
    size_skew: float = 0.8        # log-size = lo + (hi - lo) * u**size_skew; < 1 favours large
    min_aspect: float = 0.7
    max_aspect: float = 1.4
    max_occlusion: float = 0.4    # an annotated object keeps >= 60% of its pixels visible
    max_noise: float = 6.0        # sigma of the final per-pixel sensor noise (0..max_noise)
    placement_tries: int = 12
    textures: tuple[str, ...] = TEXTURES        # object textures drawn from
    backgrounds: tuple[str, ...] = BACKGROUNDS  # background kinds drawn from
    extra_lines: float = 0.25     # chance of random lines on a non-"lines" background
    texture_contrast: tuple[float, float] = (0.35, 0.6)  # second tone of two-tone textures

    @classmethod
    def square(cls, image_size: int, **kw) -> "WorldConfig":
        return cls(width=int(image_size), height=int(image_size), **kw)

    @classmethod
    def preset(cls, name: str, image_size: int = 160) -> "WorldConfig":
        """``default``: every nuisance of the product spec. ``easy``: solid colours and
        gradients only, no clutter, plain gradient backgrounds, 1-4 objects of 16-80 px;
        for smoke tests and demos whose from-scratch detector gets only a few hundred steps."""
        try:
            overrides = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown world preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return cls.square(image_size, **overrides)

    def size_range(self) -> tuple[float, float]:
        """Object size range in px, scaled from the 160 px reference to this image size."""
        scale = min(self.width, self.height) / 160.0
        return self.min_size * scale, self.max_size * scale

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists), as stored in manifests."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "WorldConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


PRESETS: dict[str, dict] = {
    "default": {},
    "easy": {
        "textures": ("solid", "gradient"), "backgrounds": ("gradient",), "extra_lines": 0.0,
        "max_clutter": 0, "max_objects": 4, "min_size": 16.0, "max_noise": 3.0,
    },
}


@dataclass
class SceneObject:
    """One drawn object. ``category`` is a class name, or None for clutter."""

    category: str | None
    kind: str                      # class name, or the clutter kind (blob, irregular, scribble)
    colour: str
    texture: str
    size: float                    # px, longer side before rotation
    aspect: float
    rotation: float                # degrees
    full_area: int                 # pixels when drawn
    visible_area: int = 0          # pixels still visible in the final image
    box: tuple[float, float, float, float] | None = None  # tight box of visible pixels
    _patch: tuple[int, int, int, int] = field(default=(0, 0, 0, 0), repr=False)

    @property
    def visible_fraction(self) -> float:
        return self.visible_area / self.full_area if self.full_area else 0.0


@dataclass
class Scene:
    image: np.ndarray              # (H, W, 3) uint8
    objects: list[SceneObject]     # in drawing order, clutter included
    owner: np.ndarray | None = None  # (H, W) int16: index into objects per pixel, -1 = background

    @property
    def annotations(self) -> list[SceneObject]:
        return [o for o in self.objects if o.category is not None]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one image, seeded from (seed, split, index)."""
    try:
        code = SPLIT_CODES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_CODES)}") from None
    return np.random.default_rng([int(seed), code, int(index)])


_NOISE_TILE = np.random.default_rng(20240917).standard_normal((512, 512), dtype=np.float32)


def _gaussian_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Standard normal (h, w) noise: a randomly placed, flipped window of a fixed tile
    (drawing fresh normals per image is the slowest step of rendering)."""
    th, tw = _NOISE_TILE.shape
    if h > th or w > tw:
        return rng.standard_normal((h, w), dtype=np.float32)
    y, x = int(rng.integers(0, th - h + 1)), int(rng.integers(0, tw - w + 1))
    sy, sx = (1, -1)[int(rng.integers(0, 2))], (1, -1)[int(rng.integers(0, 2))]
    return _NOISE_TILE[y:y + h, x:x + w][::sy, ::sx]


# ---- background --------------------------------------------------------------------------

def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    base = _PALETTE_RGB[rng.integers(0, len(_PALETTE_RGB))]
    mix = rng.uniform(0.35, 0.75)
    return base * (1 - mix) + 128.0 * mix + rng.normal(0, 12, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, amp: float) -> np.ndarray:
    small = np.clip(128.0 + rng.normal(0, amp, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
    big = Image.fromarray(small, mode="RGB").resize((w, h), Image.BILINEAR)
    return np.asarray(big, dtype=np.float32) - 128.0


def _background(rng: np.random.Generator, h: int, w: int,
                config: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """A float32 (h, w, 3) background and the (k, 3) colours it is made of."""
    kind = config.backgrounds[int(rng.integers(0, len(config.backgrounds)))]
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    if kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    else:
        img = np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
        img = img + _smooth_noise(rng, h, w, int(rng.integers(3, 8)), rng.uniform(8, 25))
    colours = [c1, c2]
    if kind == "lines" or rng.random() < config.extra_lines:
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(3, 10))):
            x0, y0 = rng.uniform(-0.2, 1.2) * w, rng.uniform(-0.2, 1.2) * h
            x1, y1 = rng.uniform(-0.2, 1.2) * w, rng.uniform(-0.2, 1.2) * h
            col = c2 + rng.normal(0, 20, size=3)
            draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in np.clip(col, 0, 255)),
                      width=int(rng.integers(1, 3)))
        img = np.asarray(pil, dtype=np.float32)
    return img, np.stack(colours)


# ---- object colour and texture -----------------------------------------------------------

def _object_colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[str, np.ndarray]:
    """A jittered palette colour far enough from the background colours ``avoid``."""
    for _ in range(8):
        i = int(rng.integers(0, len(_PALETTE_RGB)))
        col = np.clip(_PALETTE_RGB[i] + rng.normal(0, 14, size=3), 0, 255).astype(np.float32)
        if np.min(np.linalg.norm(avoid - col[None], axis=1)) > 75:
            break
    return _PALETTE_NAMES[i], col


def _shade(col: np.ndarray, rng: np.random.Generator, contrast: tuple[float, float]) -> np.ndarray:
    """A second tone of the same colour (darker or lighter) for two-tone textures."""
    lum = float(col.mean())
    target = 0.0 if lum > 110 else 255.0
    return col + (target - col) * rng.uniform(*contrast)


def _texture(rng: np.random.Generator, kind: str, col: np.ndarray, h: int, w: int,
             size: float, contrast: tuple[float, float]) -> np.ndarray:
    """A float32 (h, w, 3) texture patch."""
    if kind == "solid":
        return np.broadcast_to(col, (h, w, 3))
    if kind == "noise":
        return col[None, None] + 28.0 * _gaussian_noise(rng, h, w)[..., None]
    col2 = _shade(col, rng, contrast)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    period = float(np.clip(size * rng.uniform(0.12, 0.25), 3.0, 12.0))
    if kind == "stripes":
        t = (np.mod(u, period) < period / 2).astype(np.float32)
    elif kind == "checker":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "dots":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        t = (du * du + dv * dv < (period * 0.3) ** 2).astype(np.float32)
    elif kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    t = t[..., None]
    return col[None, None] * (1 - t) + col2[None, None] * t


# ---- geometry ----------------------------------------------------------------------------

def _transform(points: np.ndarray, half: float, aspect: float, rot: float) -> np.ndarray:
    sx, sy = half * math.sqrt(aspect), half / math.sqrt(aspect)
    c, s = math.cos(rot), math.sin(rot)
    x, y = points[:, 0] * sx, points[:, 1] * sy
    return np.stack([c * x - s * y, s * x + c * y], axis=1)


def _pose(outline: Outline, half: float, aspect: float, rot: float):
    """Transform the outline's parts about the origin: (parts, lo, hi, pad) where lo/hi bound
    the drawn (additive) parts and pad is half the widest stroke."""
    parts = []
    lo = np.array([np.inf, np.inf])
    hi = -lo
    pad = 1.0
    for p in outline.parts:
        q = _transform(p.points, half, aspect, rot)
        parts.append((p, q))
        if isinstance(p, Stroke) or p.add:
            lo, hi = np.minimum(lo, q.min(0)), np.maximum(hi, q.max(0))
        if isinstance(p, Stroke):
            pad = max(pad, p.width * half)
    return parts, lo, hi, pad


def _rasterize(posed, half: float, cx: float, cy: float, w: int, h: int):
    """Draw posed parts at (cx, cy); returns the (x0, y0, x1, y1) patch and its bool mask."""
    parts, lo, hi, pad = posed
    x0, y0 = max(int(math.floor(cx + lo[0] - pad)), 0), max(int(math.floor(cy + lo[1] - pad)), 0)
    x1 = min(int(math.ceil(cx + hi[0] + pad)) + 1, w)
    y1 = min(int(math.ceil(cy + hi[1] + pad)) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return (0, 0, 0, 0), np.zeros((0, 0), bool)
    pil = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(pil)
    for p, q in parts:
        pts = (q + (cx - x0, cy - y0)).ravel().tolist()
        if isinstance(p, Stroke):
            draw.line(pts, fill=255, width=max(1, int(round(p.width * half))), joint="curve")
        else:
            draw.polygon(pts, fill=255 if p.add else 0)
    return (x0, y0, x1, y1), np.asarray(pil) > 127


# ---- the scene ---------------------------------------------------------------------------

def render_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> Scene:
    """Compose and render one scene from ``rng``."""
    h, w = config.height, config.width
    canvas, bg_colours = _background(rng, h, w, config)
    canvas = np.ascontiguousarray(canvas, dtype=np.float32)
    owner = np.full((h, w), -1, dtype=np.int16)  # index of the object owning each pixel

    n_obj = int(rng.integers(config.min_objects, config.max_objects + 1))
    n_clutter = int(rng.integers(0, config.max_clutter + 1))
    order = np.array([True] * n_obj + [False] * n_clutter)
    rng.shuffle(order)
    smin, smax = config.size_range()
    log_lo, log_hi = math.log(smin), math.log(smax)

    objects: list[SceneObject] = []
    visible: list[int] = []
    keep_min = 1.0 - config.max_occlusion
    for annotated in order:
        if annotated:
            name = CLASS_NAMES[int(rng.integers(0, len(CLASS_NAMES)))]
            outline = shape_outline(name, rng)
            category = name
        else:
            name, outline = clutter_outline(rng)
            category = None
        colour_name, colour = _object_colour(rng, bg_colours)
        texture = config.textures[int(rng.integers(0, len(config.textures)))]
        placed = None
        for _ in range(config.placement_tries):
            size = math.exp(log_lo + (log_hi - log_lo) * rng.random() ** config.size_skew)
            aspect = math.exp(rng.uniform(math.log(config.min_aspect), math.log(config.max_aspect)))
            rot = rng.uniform(0, 2 * math.pi)
            # centre the object so that its rotated extent stays inside the image
            posed = _pose(outline, size / 2, aspect, rot)
            elo, ehi = posed[1], posed[2]
            cx = rng.uniform(-elo[0], max(w - ehi[0], -elo[0] + 1e-3))
            cy = rng.uniform(-elo[1], max(h - ehi[1], -elo[1] + 1e-3))
            patch, mask = _rasterize(posed, size / 2, cx, cy, w, h)
            area = int(mask.sum())
            if area < 12:
                continue
            x0, y0, x1, y1 = patch
            covered = owner[y0:y1, x0:x1][mask]
            covered = covered[covered >= 0]
            if covered.size:
                lost = np.bincount(covered, minlength=len(objects))
                if any(
                    o.category is not None and visible[j] - lost[j] < keep_min * o.full_area
                    for j, o in enumerate(objects) if lost[j]
                ):
                    continue
                for j in np.nonzero(lost)[0]:
                    visible[j] -= int(lost[j])
            placed = (size, aspect, rot, patch, mask, area)
            break
        if placed is None:
            continue
        size, aspect, rot, patch, mask, area = placed
        x0, y0, x1, y1 = patch
        tex = _texture(rng, texture, colour, y1 - y0, x1 - x0, size, config.texture_contrast)
        np.copyto(canvas[y0:y1, x0:x1], tex, where=mask[..., None])
        np.copyto(owner[y0:y1, x0:x1], len(objects), where=mask)
        objects.append(SceneObject(
            category=category, kind=name, colour=colour_name, texture=texture, size=size,
            aspect=aspect, rotation=math.degrees(rot), full_area=area, _patch=patch,
        ))
        visible.append(area)

    for j, o in enumerate(objects):
        o.visible_area = visible[j]
        if o.category is None or visible[j] == 0:
            continue
        x0, y0, x1, y1 = o._patch
        m = owner[y0:y1, x0:x1] == j
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        o.box = (float(x0 + cols[0]), float(y0 + rows[0]), float(x0 + cols[-1] + 1),
                 float(y0 + rows[-1] + 1))

    sigma = rng.uniform(0, config.max_noise)
    if sigma > 0.5:
        canvas += (sigma * _gaussian_noise(rng, h, w))[..., None]
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Scene(image=image, objects=objects, owner=owner)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def generate_row(seed: int, split: str, index: int, config: WorldConfig = WorldConfig(), *,
                 image_id: int | None = None, category_ids: dict[str, int] | None = None) -> dict:
    """One catalog row (IMAGE_SCHEMA) for image ``index`` of ``split``.

    ``category_ids`` maps class names to ids (default: 1..20 in :data:`CLASS_NAMES` order).
    """
    if category_ids is None:
        category_ids = {n: i + 1 for i, n in enumerate(CLASS_NAMES)}
    scene = render_scene(image_rng(seed, split, index), config)
    anns = [o for o in scene.annotations if o.box is not None]
    return {
        "image_id": int(image_id if image_id is not None else index + 1),
        "file_name": f"{split}/{index:06d}.png",
        "width": config.width,
        "height": config.height,
        "image": encode_png(scene.image),
        "boxes": [list(o.box) for o in anns],
        "category_ids": [category_ids[o.category] for o in anns],
        "iscrowd": [False] * len(anns),
        "content_sha256": pixels_sha256(scene.image),  # the PNG is lossless: same pixels
    }


def draw_boxes(image: np.ndarray | Image.Image | bytes, boxes, labels=None,
               scale: int = 3) -> Image.Image:
    """An upscaled copy of ``image`` with boxes (and optional labels) drawn, for inspection."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for i, b in enumerate(boxes):
        x1, y1, x2, y2 = (float(v) * scale for v in b)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 0, 0), width=2)
        if labels is not None:
            draw.text((x1 + 2, y1 + 1), str(labels[i]), fill=(255, 255, 0))
    return image
