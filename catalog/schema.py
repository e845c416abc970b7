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


@dataclass
class DatasetManifest:
    name: str
    categories: list[Category]
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of images
    class_splits: list[ClassSplit] = field(default_factory=list)
    source: str = ""
    info: dict = field(default_factory=dict)

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
        )
