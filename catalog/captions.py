"""The embedded captioned corpus: (image, caption) pairs from the synthetic world.

This stands in for the web-scale image-text data a CLIP model is pretrained on. Scenes are
rendered with :func:`catalog.synthetic.render_scene` (same look as the detection world:
textures, clutter, occlusion), but from their own random streams, so the corpus never
reproduces an image of the catalog's train/val/test splits. Every scene gives

* one **object crop** per annotated object (the box squared up with some context, resized
  to ``crop_size``), captioned from its class (90% of the time the shape alone,
  :data:`SHAPE_TEMPLATES`: "a gear.", "a small gear on a noisy background.") or with its
  colour, texture and size (:data:`ATTRIBUTE_TEMPLATES`: "a photo of a red striped
  star5."), and
* for every second scene (configurable), one **scene** pair (the whole image resized) with
  a caption counting what is in it ("a triangle and two circles.").

30% of the scenes are "clean" (:data:`CLEAN_CONFIG`: a few solid objects, no clutter),
the rest look exactly like the detection world. All 20 classes appear, novel ones included: the corpus plays the role of the teacher's
pretraining data, not of the few-shot detection data (a web-trained CLIP has seen "gear"
too). Generation is deterministic in ``seed`` and cheap (about 10 ms per scene).

Numpy and PIL only (no torch), like the rest of the catalog. Object crops use
:func:`catalog.crops.crop_box`, the one box-cropping rule the CLIP teacher also uses when it
embeds detector boxes, so that it sees boxes at test time the way it saw them in training.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from catalog.crops import crop_box
from catalog.shapes import CLASS_NAMES
from catalog.synthetic import WorldConfig, render_scene

__all__ = [
    "CaptionedImage", "OBJECT_TEMPLATES", "SHAPE_TEMPLATES", "ATTRIBUTE_TEMPLATES", "SCENE_TEMPLATES", "TEXTURE_WORDS", "SYNONYMS",
    "CORPUS_STREAM", "CLEAN_CONFIG", "corpus_rng", "size_word", "object_caption", "scene_caption",
    "iter_captioned", "captioned_corpus", "class_coverage",
]

# A stream code that the detection world never uses (it uses 0, 1, 2 for train/val/test),
# so corpus scenes are disjoint from catalog images under the same seed.
CORPUS_STREAM = 7919

TEXTURE_WORDS: dict[str, str] = {
    "solid": "solid",
    "stripes": "striped",
    "dots": "dotted",
    "checker": "checkered",
    "gradient": "shaded",
    "noise": "grainy",
}

# Other ways people would write a class name; used for a small fraction of captions so the
# text tower also links the descriptive phrase to the shape.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "star5": ("five-pointed star", "star"),
    "star4": ("four-pointed star",),
    "lshape": ("letter l shape",),
    "tshape": ("letter t shape",),
    "ushape": ("letter u shape",),
    "zshape": ("letter z shape",),
    "semicircle": ("half circle",),
    "ring": ("donut",),
    "crescent": ("moon",),
    "cross": ("plus sign",),
    "gear": ("cog",),
}

# {a} is the article ("a"/"an") of what follows; {colour} {texture} {size} may be empty.
# Captions name the shape alone most of the time: the classes differ only by shape, and a
# corpus where colour words are common teaches colour first. Measured on 600 CPU steps:
# with 40% attribute captions the class prompts stayed nearly identical (cosine 0.98) and
# zero-shot top-1 over the 20 classes was 11%; with 10% it was 24%.
SHAPE_TEMPLATES: tuple[str, ...] = (
    "{a} {shape}.",
    "a photo of {a} {shape}.",
    "{a} {shape} shape.",
    "a close-up of {a} {shape}.",
    "a drawing of {a} {shape}.",
    "{a} {size} {shape} on a noisy background.",
)
ATTRIBUTE_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {colour} {texture} {shape}.",
    "{a} {colour} {shape}.",
    "{a} {texture} {shape}.",
    "{a} {colour} {shape} among clutter.",
    "a drawing of {a} {size} {colour} {shape}.",
)
OBJECT_TEMPLATES: tuple[str, ...] = SHAPE_TEMPLATES + ATTRIBUTE_TEMPLATES

SCENE_TEMPLATES: tuple[str, ...] = (
    "{list}.",
    "a scene with {list}.",
    "a picture of {list}.",
)

# The "clean" part of the corpus (product-photo-like): one to three solid objects on a plain
# background, no clutter. Clear silhouettes let a tower trained from scratch find shape
# features early; the cluttered, textured scenes then teach it to find them in the world.
CLEAN_CONFIG = WorldConfig(min_objects=1, max_objects=3, max_clutter=0, textures=("solid",),
                           backgrounds=("gradient", "noise"), extra_lines=0.0, max_noise=2.0)

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class CaptionedImage:
    """One corpus pair. ``category`` is the class of an object crop (None for a scene)."""

    image: np.ndarray                   # (S, S, 3) uint8
    caption: str
    kind: str                           # "object" or "scene"
    category: str | None = None
    attributes: dict = field(default_factory=dict)  # colour, texture, size / counts

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


def corpus_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of corpus scene ``index`` (never equal to a catalog image's generator)."""
    return np.random.default_rng([int(seed), CORPUS_STREAM, int(index)])


# ---- captions ------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def size_word(box: Sequence[float], image_side: float) -> str:
    """"small" / "" / "large" from the box's longer side relative to a 160 px image."""
    longest = max(float(box[2]) - float(box[0]), float(box[3]) - float(box[1]))
    rel = longest * 160.0 / max(float(image_side), 1.0)
    if rel < 24:
        return "small"
    if rel > 56:
        return "large"
    return ""


def _shape_word(category: str, rng: np.random.Generator, synonym_prob: float) -> str:
    options = SYNONYMS.get(category)
    if options and rng.random() < synonym_prob:
        return options[int(rng.integers(0, len(options)))]
    return category


def object_caption(category: str, rng: np.random.Generator, *, colour: str = "",
                   texture: str = "", size: str = "", synonym_prob: float = 0.15,
                   plain_prob: float = 0.9, templates: Sequence[str] | None = None) -> str:
    """A caption for one object crop; empty attributes drop out.

    The template is drawn from :data:`SHAPE_TEMPLATES` with probability ``plain_prob``,
    else from :data:`ATTRIBUTE_TEMPLATES` (or uniformly from ``templates`` if given)."""
    if templates is None:
        templates = SHAPE_TEMPLATES if rng.random() < plain_prob else ATTRIBUTE_TEMPLATES
    template = templates[int(rng.integers(0, len(templates)))]
    shape = _shape_word(category, rng, synonym_prob)
    words = {"colour": colour, "texture": TEXTURE_WORDS.get(texture, texture), "size": size,
             "shape": shape}
    # fill everything but the article, then pick the article for the word that follows it
    text = template.replace("{a}", "\0").format(**words)
    text = " ".join(text.split())
    head, _, tail = text.partition("\0")
    if _:
        text = head + _article(tail.strip()) + tail
    return " ".join(text.split())


def _plural(name: str) -> str:
    if name.endswith(("s", "x", "sh", "ch")):
        return name + "es"
    return name + "s"


def scene_caption(categories: Sequence[str], rng: np.random.Generator, *,
                  synonym_prob: float = 0.0,
                  templates: Sequence[str] = SCENE_TEMPLATES) -> str:
    """A caption counting the classes in a scene: "a triangle and two circles."."""
    counts = Counter(categories)
    if not counts:
        return "an empty background."
    names = list(counts)
    rng.shuffle(names)
    parts = []
    for name in names:
        n = counts[name]
        word = _shape_word(name, rng, synonym_prob)
        if n == 1:
            parts.append(f"{_article(word)} {word}")
        else:
            parts.append(f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {_plural(word)}")
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = templates[int(rng.integers(0, len(templates)))]
    return template.format(list=listing)


# ---- the corpus ----------------------------------------------------------------------------

def _scene_pairs(seed: int, index: int, config: WorldConfig, crop_size: int, context: float,
                 jitter: float, scene_captions: bool, synonym_prob: float,
                 min_box: float, plain_prob: float, clean_fraction: float) -> list[CaptionedImage]:
    rng = corpus_rng(seed, index)
    if clean_fraction > 0 and np.random.default_rng([int(seed), CORPUS_STREAM, int(index), 1]).random() < clean_fraction:
        config = replace(CLEAN_CONFIG, width=config.width, height=config.height)
    scene = render_scene(rng, config)
    side = min(config.width, config.height)
    out: list[CaptionedImage] = []
    present: list[str] = []
    for obj in scene.annotations:
        if obj.box is None:
            continue
        present.append(obj.category)
        if max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]) < min_box:
            continue
        crop = crop_box(scene.image, obj.box, size=crop_size, context=context, jitter=jitter,
                        rng=rng)
        attrs = {"colour": obj.colour, "texture": obj.texture, "size": size_word(obj.box, side)}
        caption = object_caption(obj.category, rng, synonym_prob=synonym_prob,
                                 plain_prob=plain_prob, **attrs)
        out.append(CaptionedImage(crop, caption, "object", obj.category, attrs))
    if scene_captions and present:
        whole = np.asarray(Image.fromarray(scene.image).resize((crop_size, crop_size),
                                                               Image.BILINEAR))
        caption = scene_caption(present, rng, synonym_prob=synonym_prob)
        out.append(CaptionedImage(whole, caption, "scene", None,
                                  {"counts": dict(Counter(present))}))
    return out


def iter_captioned(seed: int = 0, n_scenes: int | None = None, *, start: int = 0,
                   crop_size: int = 64, context: float = 0.2, jitter: float = 0.15,
                   scene_captions: bool | int = 2, synonym_prob: float = 0.15,
                   plain_prob: float = 0.9, clean_fraction: float = 0.3, min_box: float = 6.0,
                   image_size: int = 160,
                   config: WorldConfig | None = None) -> Iterator[CaptionedImage]:
    """Corpus pairs scene by scene (scenes ``start``, ``start + 1``, ... ``n_scenes`` of them,
    or forever when ``n_scenes`` is None). Each scene gives its object crops, then the
    whole-scene pair: for every scene if ``scene_captions`` is True, for every n-th scene
    if it is an int n (default 2), never if False/0. ``plain_prob``: share of object
    captions that name the shape alone. ``clean_fraction``: share of scenes rendered with
    :data:`CLEAN_CONFIG` instead of ``config``. Deterministic in all arguments."""
    config = config or WorldConfig.square(image_size)
    every = 1 if scene_captions is True else int(scene_captions)
    index = start
    while n_scenes is None or index < start + n_scenes:
        with_scene = every > 0 and index % every == 0
        yield from _scene_pairs(seed, index, config, crop_size, context, jitter,
                                with_scene, synonym_prob, min_box, plain_prob, clean_fraction)
        index += 1


def captioned_corpus(n: int, seed: int = 0, **kwargs) -> list[CaptionedImage]:
    """The first ``n`` pairs of :func:`iter_captioned` (same keyword arguments)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[CaptionedImage] = []
    if n == 0:
        return out
    for pair in iter_captioned(seed, **kwargs):
        out.append(pair)
        if len(out) == n:
            break
    return out


def class_coverage(pairs: Sequence[CaptionedImage]) -> dict[str, int]:
    """Object crops per class (every class of :data:`CLASS_NAMES`, zeros included)."""
    counts = Counter(p.category for p in pairs if p.kind == "object")
    return {name: counts.get(name, 0) for name in CLASS_NAMES}
