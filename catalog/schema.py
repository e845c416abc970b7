"""The catalog's on-disk schema: one Parquet row per image, one JSON manifest per dataset.

Every dataset in the catalog, whether generated (the embedded synthetic world) or imported
(COCO json, Pascal VOC XML), is stored the same way so that training, evaluation and export
never need to know where it came from:

    <root>/datasets/<name>/dataset.json      manifest (categories, splits, class splits)
    <root>/datasets/<name>/<split>.parquet    rows that follow IMAGE_SCHEMA
    <root>/class_sets/<id>.json               ordered class lists the registry points at

Boxes are absolute pixel coordinates ``[x1, y1, x2, y2]`` (torchvision's convention);
``category_ids`` refer to the manifest's categories (ids may be non-contiguous, as in COCO).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa

SPLITS = ("train", "val", "test")

# Optional column of a split table (or key of a row / target dict): one teacher embedding per box,
# in the row's box order (catalog.teacher_cache builds it; fewshot.clip.distillation reads it).
TEACHER_EMB_COLUMN = "teacher_emb"

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded PNG or JPEG bytes
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),
        pa.field("category_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("iscrowd", pa.list_(pa.bool_()), nullable=False),
        # sha256 of the decoded upright RGB pixels (catalog.content_hash); null in datasets
        # written before the column existed (reading them with this schema yields nulls)
        pa.field("content_sha256", pa.string(), nullable=True),
    ]
)


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str = ""


@dataclass(frozen=True)
class ClassSplit:
    """A fixed base/novel partition of a dataset's classes (the few-shot protocol)."""

    name: str
    base: tuple[str, ...]
    novel: tuple[str, ...]


ORIGIN_KINDS = ("imported", "held_out", "generated", "unknown")


@dataclass(frozen=True)
class SplitOrigin:
    """Where the images of one split came from (``DatasetManifest.split_origins``).

    ``kind``: ``imported`` (from an annotation file or folder), ``held_out`` (a seeded,
    class-stratified hold-out the importer took from another split because the dataset had
    none), ``generated`` (the synthetic world) or ``unknown`` (written by code that did not
    record it).
    """

    kind: str = "unknown"
    source: str = ""  # imported: annotation file/folder; held_out: the split it was taken from
    format: str = ""  # imported: "coco" | "voc"
    fraction: float | None = None  # held_out: requested fraction of the source split's images
    seed: int | None = None  # held_out: the seed of the draw
    stratify: str = ""  # held_out: how the draw was stratified ("rarest_class")
    images: int = 0  # held_out: images moved out of the source split
    ids_sha256: str = ""  # held_out: sha256 of the sorted moved image ids, one per line
    image_ids: tuple[int, ...] = ()  # held_out: the moved ids (empty above HOLDOUT_IDS_CAP)

    def __post_init__(self):
        if self.kind not in ORIGIN_KINDS:
            raise ValueError(f"unknown split origin {self.kind!r}; expected one of {ORIGIN_KINDS}")

    @property
    def held_out(self) -> bool:
        return self.kind == "held_out"

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind}
        for key in ("source", "format", "fraction", "seed", "stratify", "images", "ids_sha256"):
            value = getattr(self, key)
            if value is not None and value != "" and (self.held_out or key != "images"):
                out[key] = value
        if self.image_ids:
            out["image_ids"] = list(self.image_ids)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "SplitOrigin":
        return cls(
            kind=data.get("kind", "unknown"),
            source=data.get("source", ""),
            format=data.get("format", ""),
            fraction=data.get("fraction"),
            seed=data.get("seed"),
            stratify=data.get("stratify", ""),
            images=int(data.get("images", 0)),
            ids_sha256=data.get("ids_sha256", ""),
            image_ids=tuple(int(i) for i in data.get("image_ids", ())),
        )


@dataclass
class DatasetManifest:
    """A dataset's categories, splits and what its writer decided about them.

    Fields added later read with defaults from older manifests: ``split_origins`` empty
    (every split's origin "unknown"), ``content_hash`` "" (rows may lack ``content_sha256``),
    ``overlap`` empty (splits never checked for shared images).
    """

    name: str
    categories: list[Category]
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of images
    class_splits: list[ClassSplit] = field(default_factory=list)
    source: str = ""
    info: dict = field(default_factory=dict)
    # split -> where its images came from (imported, held out from another split, generated)
    split_origins: dict[str, SplitOrigin] = field(default_factory=dict)
    # the algorithm of every row's content_sha256 (catalog.content_hash.CONTENT_HASH_ALGO);
    # "" for datasets written before rows carried it
    content_hash: str = ""
    # what the last import decided about images shared across splits:
    # {"method": "content_sha256", "policy": ..., "groups": n, "removed": {split: n}}
    overlap: dict = field(default_factory=dict)

    def category_by_name(self) -> dict[str, Category]:
        return {c.name: c for c in self.categories}

    def category_by_id(self) -> dict[int, Category]:
        return {c.id: c for c in self.categories}

    def class_split(self, name: str) -> ClassSplit:
        for cs in self.class_splits:
            if cs.name == name:
                return cs
        known = ", ".join(cs.name for cs in self.class_splits) or "none"
        raise KeyError(f"dataset {self.name!r} has no class split {name!r} (known: {known})")

    # ---- which split is which ---------------------------------------------------------
    def has_split(self, split: str) -> bool:
        """True when ``split`` exists and holds at least one image."""
        return self.splits.get(split, 0) > 0

    @property
    def has_test(self) -> bool:
        return self.has_split("test")

    @property
    def selection_split(self) -> str | None:
        """The split every choice is made on ("val"), None when the dataset has no val."""
        return "val" if self.has_split("val") else None

    @property
    def report_split(self) -> str | None:
        """The split figures are reported on ("test"), None when the dataset has no test."""
        return "test" if self.has_split("test") else None

    def origin(self, split: str) -> SplitOrigin:
        """Where ``split`` came from (kind "unknown" when the writer did not record it)."""
        return self.split_origins.get(split, SplitOrigin())

    def held_out_splits(self) -> dict[str, SplitOrigin]:
        """The splits the importer held out from another split: ``{split: origin}``."""
        return {s: o for s, o in self.split_origins.items() if o.held_out}

    @property
    def has_content_hashes(self) -> bool:
        """True when every row carries ``content_sha256`` (datasets written by current code)."""
        return bool(self.content_hash)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "categories": [asdict(c) for c in self.categories],
            "splits": dict(self.splits),
            "class_splits": [
                {"name": cs.name, "base": list(cs.base), "novel": list(cs.novel)}
                for cs in self.class_splits
            ],
            "source": self.source,
            "info": self.info,
            "split_origins": {s: o.to_json() for s, o in self.split_origins.items()},
            "content_hash": self.content_hash,
            "overlap": dict(self.overlap),
        }

    @classmethod
    def from_json(cls, data: dict) -> "DatasetManifest":
        return cls(
            name=data["name"],
            categories=[Category(**c) for c in data["categories"]],
            splits={k: int(v) for k, v in data.get("splits", {}).items()},
            class_splits=[
                ClassSplit(cs["name"], tuple(cs["base"]), tuple(cs["novel"]))
                for cs in data.get("class_splits", [])
            ],
            source=data.get("source", ""),
            info=data.get("info", {}),
            split_origins={s: SplitOrigin.from_json(o)
                           for s, o in data.get("split_origins", {}).items()},
            content_hash=data.get("content_hash", ""),
            overlap=dict(data.get("overlap", {})),
        )
